"""azmlinfsrv's entry functions for the online endpoint: `score.py` re-exports them, and
`medsam2-endpoint serve` points azmlinfsrv at this file, so an installed wheel serves without a checkout."""

from azureml_inference_server_http.api.aml_request import AMLRequest, rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

from medsam2_endpoint.api.azure import ScoreApp

app = ScoreApp()


def init() -> None:
    app.init()


@rawhttp  # type: ignore[untyped-decorator]
def run(request: AMLRequest) -> AMLResponse:
    return app.run(request)
