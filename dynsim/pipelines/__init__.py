"""Assembled experiments: the similarity-matching network (``dssm``) and the self-supervised pipelines (``ssl``)."""
