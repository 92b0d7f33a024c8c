"""Azure ML entry script (online endpoint): azmlinfsrv calls init() once per worker, then run() per request.

The logic is in `medsam2_endpoint.api.azure`; this file stays where Azure expects it.
"""

import sys
from pathlib import Path

# On Azure the code folder is shipped as-is (not pip-installed): make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from azureml_inference_server_http.api.aml_request import AMLRequest, rawhttp  # noqa: E402
from azureml_inference_server_http.api.aml_response import AMLResponse  # noqa: E402

from medsam2_endpoint.api.azure import ScoreApp  # noqa: E402

app = ScoreApp()


def init() -> None:
    app.init()


@rawhttp
def run(request: AMLRequest) -> AMLResponse:
    return app.run(request)
