"""``jaxlm export --checkpoint DIR --family NAME --out HF_DIR``: write a model as an HF checkpoint.

The checkpoint is anything ``jaxlm.checkpoint.load_model`` reads (a jaxlm run or step directory,
or an HF directory). The family (``olmo``, ``olmo2``, ``llama``, ``qwen2``, ``qwen3``,
``gpt_neox``, ``gpt2``) must express the model exactly: one whose architecture it cannot
express is refused with the fields named. ``tokenizer.json`` is copied next to the weights, and
its end-of-document / padding ids go into ``config.json`` as eos / pad ids. ``--intervention
FILE --scale S`` bakes an intervention into the exported weights where it bakes exactly
(``jaxlm.intervene.bake_into_params``) and the family has the parameters it needs: an
ITI or other ``head_out`` edit becomes the attention output bias (``hf.with_baked_output_bias``).
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from jaxlm import hf
    from jaxlm.checkpoint import load_model
    from jaxlm.cli.steer import load_intervention

    hf.get_family(args.family)  # an unknown family is refused before the model is read
    loaded = load_model(args.checkpoint)
    config, params = loaded.config, loaded.params
    intervention = load_intervention(args, config)
    if intervention is not None:
        from jaxlm.intervene import bake_into_params

        config, params = hf.with_baked_output_bias(config, bake_into_params(config, params, intervention), args.family)
    token_ids = None
    if loaded.tokenizer is not None:
        token_ids = {"eos_token_id": loaded.tokenizer.eos_id, "pad_token_id": loaded.tokenizer.pad_id}
    out = hf.save(config, params, args.out, family=args.family, dtype=args.dtype, token_ids=token_ids)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save(out / "tokenizer.json")
    print(f"exported {args.checkpoint} as {hf.get_family(args.family).architecture} ({args.dtype}) to {out}")
    return 0


def register(subparsers) -> None:
    from jaxlm.cli import add_documented_parser
    from jaxlm.cli.steer import add_intervention_arguments
    from jaxlm.hf.io import SAVE_DTYPES

    parser = add_documented_parser(subparsers, "export", "write a model as an HF checkpoint of a family", __doc__)
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint step directory or HF directory")
    parser.add_argument("--family", default="olmo", help="HF family to write (default: olmo)")
    parser.add_argument("--out", required=True, help="output HF checkpoint directory")
    parser.add_argument("--dtype", default="float32", choices=SAVE_DTYPES, help="stored tensor type")
    add_intervention_arguments(parser)
    parser.set_defaults(func=run)
