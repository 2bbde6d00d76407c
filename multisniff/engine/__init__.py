"""The capture session: task group, pod churn, copying and teardown."""
