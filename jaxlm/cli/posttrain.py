"""``jaxlm posttrain {data,sft,dpo}``: post-train a model from its checkpoint.

  data  sample continuations of a prompt pool from the model, score them, and write SFT rows
        (the least toxic sample per prompt) and DPO pairs (least vs most toxic)
  sft   supervised fine-tuning on prompt/response JSONL (loss on the responses only)
  dpo   direct preference optimisation on prompt/chosen/rejected JSONL

``sft`` and ``dpo`` are ``jaxlm train`` with the config's ``objective`` set (``init_from`` names
the starting model); they resume like it.
"""

from __future__ import annotations

import functools

from jaxlm.cli import add_documented_parser


def register(subparsers) -> None:
    from jaxlm.cli import posttrain_data, train

    parser = add_documented_parser(subparsers, "posttrain", "post-train a model: on-policy data, SFT, DPO", __doc__)
    commands = parser.add_subparsers(dest="posttrain_command", metavar="STEP")
    commands.required = True
    data = commands.add_parser("data", help="build SFT rows and DPO pairs from the model's own samples")
    posttrain_data.add_arguments(data)
    data.set_defaults(func=posttrain_data.run, command_name="posttrain data")
    for objective, summary in (("sft", "supervised fine-tuning on prompt/response rows"),
                               ("dpo", "direct preference optimisation on preference pairs")):
        sub = commands.add_parser(objective, help=summary)
        train.add_arguments(sub)
        sub.set_defaults(func=functools.partial(train.run, objective=objective), command_name=f"posttrain {objective}")
