"""The LESS state: feature maps, normalisers and the per-layer module that holds them."""

from less_exp.state.feature_maps import Elu1, FeatureMap, LessMLP
from less_exp.state.less_state import LessState, LessStates
from less_exp.state.normalizers import JointNormalizer

__all__ = ["Elu1", "FeatureMap", "JointNormalizer", "LessMLP", "LessState", "LessStates"]
