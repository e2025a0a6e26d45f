from kdctl.bundle.store import (Bundle, BundleWriter, load_bundle, next_run_dir, sha256_file, verify_bundle,
                                write_json_atomic, write_text_atomic)

__all__ = ["Bundle", "BundleWriter", "load_bundle", "next_run_dir", "sha256_file", "verify_bundle",
           "write_json_atomic", "write_text_atomic"]
