"""kdctl: distill a large detector into a small one, export it, profile it on the device, gate it in CI."""

__version__ = "0.2.0"

# Ultralytics reads these when first imported: keep it offline and quiet, and never let it pip-install at run time.
from kdctl.detectors.ultralytics_env import prepare as _prepare_ultralytics  # noqa: E402

_prepare_ultralytics()
