"""The ConfigMap of the HCCL rank table that worker pods on several Ascend nodes mount: the table
(key hccl.json) only once it is complete, with a status key saying what is still missing."""

from __future__ import annotations

import json

from .. import names
from ..ascend import rank_table
from .context import Context, Obj, metadata

STATUS_KEY = "status"


def rank_table_config_map(ctx: Context, table: rank_table.RankTable) -> Obj:
    if table.complete:
        data = {
            rank_table.TABLE_KEY: json.dumps(table.table, indent=2) + "\n",
            STATUS_KEY: "completed",
        }
    else:
        data = {STATUS_KEY: "initializing: " + "; ".join(table.missing)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(ctx, names.rank_table(ctx.name), names.RANK_TABLE),
        "data": data,
    }
