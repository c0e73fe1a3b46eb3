"""Model lifecycle: stage moves with approval gates, rollback, and the audit log."""

from infercore.lifecycle.audit import AuditLog
from infercore.lifecycle.control import LifecycleRollout
from infercore.lifecycle.manager import ALLOWED, Approval, Lifecycle

__all__ = ["ALLOWED", "Approval", "AuditLog", "Lifecycle", "LifecycleRollout"]
