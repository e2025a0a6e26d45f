"""kdctl: distill a large detector into a small one, export it, profile it on the device, gate it in CI."""

__version__ = "0.2.0"

import os as _os

# ONNX Runtime (>= 1.29 on Linux and macOS) keeps a device id and usage events under ~/.cache/Microsoft and sends
# them to Microsoft unless ORT_DISABLE_TELEMETRY is set before it loads; kdctl turns that off unless the user set it.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# Ultralytics reads these when first imported: keep it offline and quiet, and never let it pip-install at run time.
from kdctl.detectors.ultralytics_env import prepare as _prepare_ultralytics  # noqa: E402

_prepare_ultralytics()
