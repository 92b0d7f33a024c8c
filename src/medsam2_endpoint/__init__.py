"""medsam2-endpoint: MedSAM2 / LiteMedSAM promptable segmentation as an Azure ML scoring package."""

__version__ = "0.1.0"
