from kdctl.bundle.output import check_output_file, claim_output
from kdctl.bundle.store import (Bundle, BundleWriter, load_bundle, next_run_dir, require_verified, sha256_file,
                                verify_bundle, write_json_atomic, write_text_atomic)

__all__ = ["Bundle", "BundleWriter", "check_output_file", "claim_output", "load_bundle", "next_run_dir",
           "require_verified", "sha256_file", "verify_bundle", "write_json_atomic", "write_text_atomic"]


def reference_metrics(export_metrics: dict) -> dict:
    """mAP of the PyTorch model an export bundle was checked against (FP32, or the fake-quantized QAT student)."""
    return export_metrics.get("pytorch") or export_metrics.get("pytorch_fp32") or {}
