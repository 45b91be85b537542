"""How a compressed bucket travels: one question, several answers.

The question: given every rank's gradient of one bucket, return on every rank the averaged
update, each tensor compressed by this rank's DGC memory (``dgc.Compressor``) on the way.
Two layers answer it:

* a *topology* decides where compression happens and over which ranks the pairs go:
  ``flat`` (``transport.flat``: every rank compresses its whole gradient; the pairs go to
  all ranks) or ``hierarchical`` (``transport.hierarchical``: dense inside a node,
  compressed across nodes; or, with ``intra_node: sparse``,
  ``transport.hierarchical_sparse``: each node merges its ranks' pairs into one set and
  only pairs cross any link);
* an *exchange* sums selected (index, value) pairs and dense slots over one group:
  ``allgather`` (``transport.allgather``, the paper's) or ``sparse_allreduce``
  (``transport.sparse_allreduce``, traffic per rank independent of the group's size),
  picked per bucket by the plan (``dgc.plan``) and started by ``transport.exchange``.

Regions and capacities of the sparse allreduce are per tensor, but the route (pairs by
one exchange or the other, or the dense fallback) is chosen per bucket from its tensors
together. DDP's first iteration after a restart buckets the tensors in registration order,
later ones in gradient order: where that changes a bucket's route, that one step differs
from the uninterrupted run (resume is bitwise when each bucket keeps its route, e.g. a
model in one bucket, or the flat allgather at 2 ranks, whose routes sum alike).

``dgc.hook`` picks the topology by name (``DGCOptions.topology``) for the DDP hook, and
``dgc.horovod`` runs the flat topology's exchange over Horovod; the cost model prices the
same names. Each topology's ``run(state, bucket, flat, masks, fixed)`` starts its
collectives in the hook body, in the same order on every rank, and returns a future of
``flat`` holding the average over ranks with the dense slots' momentum applied.
"""
from dgc.transport import flat, hierarchical, hierarchical_sparse

TOPOLOGIES = {"flat": flat.run, "hierarchical": hierarchical.run}


def topology(options):
    """The ``run`` of the topology ``options`` name (``topology``, ``intra_node``)."""
    if options.topology == "hierarchical" and options.intra_node == "sparse":
        return hierarchical_sparse.run
    return TOPOLOGIES[options.topology]


__all__ = ["TOPOLOGIES", "topology"]
