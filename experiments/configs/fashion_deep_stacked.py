"""The main job's 784-1000-500-250-30 autoencoder, pretrained greedily layer by layer, then fine-tuned.

Hinton & Salakhutdinov (2006) pretrained each layer pair (as RBMs) before fine-tuning; here each
pair is an autoencoder trained for `stacking.pretrain_epochs` epochs on the previous codes.
Fine-tuning uses exactly the main job's settings (experiments/configs/fashion_deep.py), so the
main job is the from-scratch comparison. Run:
    python -m experiments.main --config=experiments/configs/fashion_deep_stacked.py --workdir=runs/fashion_deep_stacked

Expect: see experiments/RESULTS.md (row 2).
"""

from experiments.configs import fashion_deep


def get_config():
    c = fashion_deep.get_config()
    c.stacking.update(pretrain_epochs=2, compare_scratch=False)
    return c
