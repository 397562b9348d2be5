"""Evaluation: toxicity scorers (``toxicity``, ``toxicity_model``), the RTP and ToxiGen
protocols (``protocols``) and capability cost (``capability``).

Submodules are imported on demand (scikit-learn and the scorers' models load lazily):
``from jaxlm.evaluate.toxicity import get_scorer``.
"""
