"""Names the command line offers as choices, kept free of heavy imports so `msa --help` starts at once
(msa.modeling.build and msa.evaluate define what each name means and check that the lists agree)."""

BACKBONE_NAMES = ("vit_b", "vit_l", "vit_h", "lite_medsam", "vit_tiny", "lite_medsam_tiny")
PROTOCOLS = ("box", "click1", "click3", "roi", "3d-click")
RUNTIMES = ("auto", "torch", "openvino")
PRECISIONS = ("fp32", "bf16")
