"""Evaluation: PSNR/SSIM, the FashionMNIST classifier and its features, FID/KID, memorisation."""
from dipddpm.evaluate.classifier import (Classifier, FashionCNN, classifier_dir, load_classifier,
                                         to_uint8, train_classifier)
from dipddpm.evaluate.fid import (feature_stats, fid_from_features, frechet_distance, kid,
                                  real_vs_real_floor, sample_metrics, split_features, train_stats)
from dipddpm.evaluate.image_metrics import psnr, ssim
from dipddpm.evaluate.memorisation import memorisation_check, memorisation_report, nearest

__all__ = ["Classifier", "FashionCNN", "classifier_dir", "load_classifier", "to_uint8",
           "train_classifier", "feature_stats", "fid_from_features", "frechet_distance", "kid",
           "real_vs_real_floor", "sample_metrics", "split_features", "train_stats", "psnr",
           "ssim", "memorisation_check", "memorisation_report", "nearest"]
