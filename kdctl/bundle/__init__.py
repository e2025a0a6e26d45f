from kdctl.bundle.output import check_output_file, claim_output
from kdctl.bundle.store import (Bundle, BundleWriter, artifact_given, load_bundle, next_run_dir, recorded_parent,
                                require_verified, sha256_file, verify_bundle, verify_lineage, write_json_atomic,
                                write_text_atomic)

__all__ = ["Bundle", "BundleWriter", "artifact_given", "check_output_file", "claim_output", "load_bundle",
           "next_run_dir", "recorded_parent", "require_verified", "sha256_file", "verify_bundle", "verify_lineage",
           "trained_source", "write_json_atomic", "write_text_atomic"]


def reference_metrics(export_metrics: dict) -> dict:
    """mAP of the PyTorch model an export bundle was checked against (FP32, or the fake-quantized QAT student)."""
    return export_metrics.get("pytorch") or export_metrics.get("pytorch_fp32") or {}


def delta_interval(drop_ci, missing: str = "—") -> str:
    """An export artifact's stored 95 % interval of its mAP50-95 drop (``metrics.map50_95_drop_ci95``, [lo, hi]) as
    the interval of its change vs PyTorch, the sign the tables print (negative: lower); ``missing`` for a bundle
    written before kdctl kept it."""
    if not (isinstance(drop_ci, (list, tuple)) and len(drop_ci) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in drop_ci)):
        return missing
    lo, hi = 0.0 - drop_ci[1], 0.0 - drop_ci[0]  # 0.0 - x: no "-0.0000" for an interval of exactly 0
    return f"[{lo:+.4f}, {hi:+.4f}]"


def trained_source(bundle: Bundle) -> tuple[str, Bundle | None, str | None]:
    """The train/distill bundle ``bundle`` (an export) records as its source, looked up as :func:`recorded_parent`
    does: (status, the bundle there, why); status "none" where it records none (exported from a checkpoint file)."""
    record = next((p for p in bundle.manifest.get("parents", [])
                   if isinstance(p, dict) and p.get("stage") in ("train", "distill")), None)
    return ("none", None, None) if record is None else recorded_parent(record)
