"""`xatl verify`: checks of a converted folder, and the report they make."""

from xatl_convert.verify.checks import verify
from xatl_convert.verify.report import CheckResult, VerifyReport

__all__ = ["CheckResult", "VerifyReport", "verify"]
