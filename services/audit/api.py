"""The audit gRPC servicer: the log's entries, its signed checkpoints, and proofs.

Every request field is bounded here: sizes within the tree (or the log, for entries), a start
before its end, at most :data:`MAX_PAGE` entries a call, hashes of exactly 32 bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from services.kernel.contract.merkle import HASH_SIZE
from services.kernel.errors import FailedPrecondition, InvalidArgument, NotFound
from services.kernel.eventstore import EventStore
from services.kernel.rpc import ServicerContext
from services.kernel.validate import identifier
from subsidy.v1 import audit_pb2, audit_pb2_grpc

from . import checkpoints, log, tree

MAX_PAGE = 1000


def _entry(row: tree.Row, *, parsed: bool = True) -> audit_pb2.AuditEntry:
    idx, leaf, chained, data = row
    entry = audit_pb2.AuditEntry(
        index=idx, leaf_hash_hex=leaf.hex(), chain_hash_hex=chained.hex(), envelope_bytes=data
    )
    if parsed:
        try:
            entry.envelope.ParseFromString(data)
        except DecodeError:  # what was stored is not an envelope: the bytes tell the auditor
            entry.ClearField("envelope")
    return entry


def _checkpoint(p: checkpoints.Published) -> audit_pb2.Checkpoint:
    at = Timestamp()
    at.FromDatetime(p.published_at)
    return audit_pb2.Checkpoint(
        tree_size=p.tree_size, root_hash=p.root_hash, note=p.note, published_at=at
    )


@contextmanager
def _refusing_a_corrupt_log() -> Iterator[None]:
    """What the service refuses to integrate, prove or sign (its stored log or tree is not what
    was written): FAILED_PRECONDITION, and the alert its log line already raised."""
    try:
        yield
    except (tree.TreeCorrupt, checkpoints.CheckpointRefused) as exc:
        raise FailedPrecondition("LOG_INCONSISTENT", f"the audit log refuses: {exc}") from None


def _tree_size(field: str, value: int, size: int) -> int:
    """A tree size the caller may ask about: 1..the tree's size now."""
    if value < 1:
        raise InvalidArgument("INVALID_TREE_SIZE", f"{field}: at least 1", field=field)
    if value > size:
        raise InvalidArgument(
            "BEYOND_TREE",
            f"{field}: the tree holds {size} entries (ask GetCheckpoint for a fresh one)",
            field=field,
        )
    return value


class AuditApi(audit_pb2_grpc.AuditServiceServicer):
    def __init__(
        self,
        store: EventStore,
        signer: checkpoints.Signer,
        catch_up: Callable[[], Awaitable[None]],
    ) -> None:
        self.store = store
        self.signer = signer
        self.catch_up = catch_up  # integrate every entry appended so far

    async def GetLogInfo(
        self, request: audit_pb2.GetLogInfoRequest, context: ServicerContext
    ) -> audit_pb2.LogInfo:
        size, chained, by_service = await log.info(self.store)
        return audit_pb2.LogInfo(
            size=size,
            head_hash_hex=chained.hex(),
            entries_by_service=by_service,
            tree_size=await tree.current_size(self.store),
        )

    async def GetEntries(
        self, request: audit_pb2.GetEntriesRequest, context: ServicerContext
    ) -> audit_pb2.GetEntriesResponse:
        if request.start < 0:
            raise InvalidArgument("INVALID_START", "start: must be ≥ 0", field="start")
        if request.end:
            if request.limit:
                raise InvalidArgument("END_OR_LIMIT", "limit: give end or limit", field="limit")
            if not request.start < request.end <= request.start + MAX_PAGE:
                raise InvalidArgument(
                    "INVALID_END", f"end: after start, at most {MAX_PAGE} later", field="end"
                )
            if request.packed:  # the size read with the page, in one statement
                size, page = await tree.read_packed(self.store, request.start, request.end)
                if request.end > size:
                    raise InvalidArgument(
                        "BEYOND_LOG", f"end: the log holds {size} entries", field="end"
                    )
                return page
            size = await log.size(self.store)
            if request.end > size:
                raise InvalidArgument(
                    "BEYOND_LOG", f"end: the log holds {size} entries", field="end"
                )
            limit = request.end - request.start
        elif not 1 <= request.limit <= MAX_PAGE:
            raise InvalidArgument("INVALID_LIMIT", f"limit: 1..{MAX_PAGE}", field="limit")
        else:
            limit = request.limit
        if request.packed:  # (with end, answered above)
            raise InvalidArgument("PACKED_NEEDS_END", "packed: give end", field="packed")
        rows = await tree.read_entries(self.store, request.start, limit, end=request.end)
        parsed = not request.bytes_only
        return audit_pb2.GetEntriesResponse(entries=[_entry(r, parsed=parsed) for r in rows])

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: ServicerContext
    ) -> audit_pb2.Checkpoint:
        if request.tree_size < 0:
            raise InvalidArgument("INVALID_TREE_SIZE", "tree_size: ≥ 0", field="tree_size")
        if request.tree_size and request.fresh:
            raise InvalidArgument(
                "FRESH_OR_SIZE", "fresh: a fresh checkpoint or one of a size", field="fresh"
            )
        if request.tree_size:
            found = await checkpoints.at_size(self.store, request.tree_size)
            if found is None:
                raise NotFound(
                    "CHECKPOINT_NOT_FOUND",
                    "tree_size: no checkpoint was published at this size",
                    field="tree_size",
                )
            return _checkpoint(found)
        with _refusing_a_corrupt_log():
            if request.fresh:
                await self.catch_up()
            last = None if request.fresh else await checkpoints.latest(self.store)
            return _checkpoint(last or await checkpoints.publish(self.store, self.signer))

    async def GetInclusionProof(
        self, request: audit_pb2.GetInclusionProofRequest, context: ServicerContext
    ) -> audit_pb2.InclusionProof:
        which = request.WhichOneof("leaf")
        if which is None:
            raise InvalidArgument(
                "LEAF_REQUIRED", "index: give an index or a leaf_hash", field="index"
            )
        size = _tree_size("tree_size", request.tree_size, await tree.current_size(self.store))
        if which == "leaf_hash":
            if len(request.leaf_hash) != HASH_SIZE:
                raise InvalidArgument("INVALID_LEAF_HASH", "leaf_hash: 32 bytes", field="leaf_hash")
            found = await tree.index_of(self.store, request.leaf_hash, size)
            if found is None:
                raise NotFound(
                    "LEAF_NOT_FOUND",
                    f"leaf_hash: no entry below {size} has this leaf hash",
                    field="leaf_hash",
                )
            index = found
        else:
            index = request.index
            if not 0 <= index < size:
                raise InvalidArgument(
                    "INVALID_INDEX", f"index: 0..{size - 1} in a tree of {size}", field="index"
                )
        with _refusing_a_corrupt_log():
            leaf, hashes = await tree.inclusion_proof(self.store, index, size)
        return audit_pb2.InclusionProof(index=index, tree_size=size, leaf_hash=leaf, hashes=hashes)

    async def GetConsistencyProof(
        self, request: audit_pb2.GetConsistencyProofRequest, context: ServicerContext
    ) -> audit_pb2.ConsistencyProof:
        new = _tree_size("new_size", request.new_size, await tree.current_size(self.store))
        if not 1 <= request.old_size <= new:
            raise InvalidArgument(
                "INVALID_OLD_SIZE", f"old_size: 1..new_size ({new})", field="old_size"
            )
        with _refusing_a_corrupt_log():
            hashes = await tree.consistency_proof(self.store, request.old_size, new)
        return audit_pb2.ConsistencyProof(old_size=request.old_size, new_size=new, hashes=hashes)

    async def ListOrderEntries(
        self, request: audit_pb2.ListOrderEntriesRequest, context: ServicerContext
    ) -> audit_pb2.GetEntriesResponse:
        order_id = identifier("order_id", request.order_id, max_len=tree.MAX_KEY)
        if not 0 <= request.limit <= MAX_PAGE:
            raise InvalidArgument("INVALID_LIMIT", f"limit: 0..{MAX_PAGE}", field="limit")
        indexes = await tree.indexes_naming(self.store, order_id, request.limit or MAX_PAGE)
        rows = await tree.read_entries(self.store, indexes=indexes) if indexes else []
        return audit_pb2.GetEntriesResponse(entries=[_entry(r) for r in rows])
