"""Triton Python-backend models. Promotion copies each file into a version folder as `model.py`.

They import only numpy, nvidia.dali and onnxruntime (all in the NGC Triton container's reach), never
rsseg, so the served repository runs wherever those are installed.
"""
