"""The LESS state: feature maps, re-weightings, normalisers, gatings and the per-layer module that holds them."""

from less_exp.state.feature_maps import DiJiang, Elu1, FeatureMap, Hedgehog, LessMLP, Performer, Relu, Taylor
from less_exp.state.gating import Decay, Gating, ScalarGate, VectorGate
from less_exp.state.less_state import Gates, LessState, LessStates
from less_exp.state.normalizers import JointNormalizer, NormNormalizer
from less_exp.state.reweighting import CosFormer, LeaPformer, Reweighting

__all__ = ["CosFormer", "Decay", "DiJiang", "Elu1", "FeatureMap", "Gates", "Gating", "Hedgehog", "JointNormalizer",
           "LeaPformer", "LessMLP", "LessState", "LessStates", "NormNormalizer", "Performer", "Relu", "Reweighting",
           "ScalarGate", "Taylor", "VectorGate"]
