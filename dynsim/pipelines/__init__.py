"""Assembled experiments: the similarity-matching network (``dssm``) and others."""
