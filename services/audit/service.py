"""How audit is wired into the shared service runner: one consumer of every event, and the
loop that integrates new entries into the Merkle tree and signs checkpoints on a schedule."""

from __future__ import annotations

import asyncio
import logging

from services.kernel.app import Runtime, ServiceSpec, Wiring
from services.kernel.background import every
from services.kernel.consumer import EventConsumer
from subsidy.v1 import audit_pb2, audit_pb2_grpc, cases_pb2, cases_pb2_grpc

from . import cases, checkpoints, detection, log, tree
from .api import AuditApi
from .cases_api import CasesApi

logger = logging.getLogger(__name__)
# How often new entries are integrated into the tree: proofs and fresh checkpoints cover an
# entry within about this long of its arrival (a fresh checkpoint integrates at once).
INTEGRATE_EVERY_S = 1.0
# How often overdue cases are looked for: deadlines are hours, an alert comes within this.
CASE_SWEEP_EVERY_S = 30.0


async def build(rt: Runtime) -> Wiring:
    await log.ensure_head(rt.store)
    await tree.ensure_tree(rt.store)
    signer = checkpoints.Signer(rt.vault, rt.settings.audit_origin)
    loop = asyncio.get_running_loop()
    last_signed = [loop.time()]

    async def catch_up() -> None:
        # A batch short of full reached the log's size as it was read: everything appended
        # before this call is in the tree (another round would be an empty transaction).
        while await tree.integrate(rt.store) >= tree.BATCH:
            pass

    async def step() -> None:
        await catch_up()
        if loop.time() - last_signed[0] >= rt.settings.checkpoint_interval_s:
            await checkpoints.publish(rt.store, signer)  # the last one if nothing was added
            last_signed[0] = loop.time()

    async def tree_loop(stop: asyncio.Event) -> None:
        await every(
            stop,
            INTEGRATE_EVERY_S,
            step,
            log=logger,
            failure="audit tree integration or checkpoint failed",
            alert=checkpoints.ALERT,
        )

    supervision = cases.Cases(rt.store, rt.vault, sweep_every_s=CASE_SWEEP_EVERY_S)
    # Post-hoc fraud detection over the log; each finding opens a case (detection.py).
    detect = detection.Detection(
        rt.store, supervision, detection.rules_from_file(rt.settings.detector_rules_file)
    )

    async def detection_loop(stop: asyncio.Event) -> None:
        await detect.loop(stop, rt.settings.detect_every_s)

    return Wiring(
        registrations=[
            (
                audit_pb2_grpc.add_AuditServiceServicer_to_server,
                AuditApi(rt.store, signer, catch_up),
            ),
            # Supervision cases (complaints, risk alerts, operator activity): cases_api.py.
            (cases_pb2_grpc.add_CaseServiceServicer_to_server, CasesApi(supervision)),
        ],
        service_names=[
            audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
            cases_pb2.DESCRIPTOR.services_by_name["CaseService"].full_name,
        ],
        consumers=[
            # A fetched batch's events appended in one statement (log.append_all).
            EventConsumer("audit-log", ["events.>"], log.append, batch_handler=log.append_all),
            # Every event a person may cause, and the ones it reads (cases.supervised_subjects).
            EventConsumer("audit-supervision", cases.supervised_subjects(), supervision.on_event),
        ],
        # One worker of several at a time integrates, signs, sweeps and detects.
        singular=[tree_loop, supervision.overdue_loop, detection_loop],
    )


SPEC = ServiceSpec(name="audit", metadata=log.metadata, build=build)
