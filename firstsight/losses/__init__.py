"""KD losses. The loss classes are re-exported here: each `conf/distill_loss/*.yaml` names its class as
`firstsight.losses.<Class>` (the `_target_`, also an MLflow param of every run)."""

from firstsight.losses.kd import JSD, ForwardKL, NoKD, ReverseKL, SkewForwardKL, SkewReverseKL

__all__ = ["ForwardKL", "JSD", "NoKD", "ReverseKL", "SkewForwardKL", "SkewReverseKL"]
