"""Sharing on any Dask cluster, without MPI: LocalCluster, ``dask worker``, dask-jobqueue, dask-mpi.

One module per concern:

- :mod:`.files`: the names of the files and opening only our own;
- :mod:`.groups`: which processes see the same shared memory (a probe
  file), and holding a group alive (a shared ``flock``);
- :mod:`.lifetimes`: sweeping the files of groups nobody holds (crash
  cleanup, ``python -m hpcshare clean``);
- :mod:`.copies`: writing an object's file completely or not at all, and
  each worker's decoded copies;
- :mod:`.transfer`: bytes between groups, worker to worker, over Dask's comms;
- :mod:`.plugins`: the scheduler's, workers' and nannies' parts;
- :mod:`.resolve`: handles to objects (the task path);
- :mod:`.api`: ``put`` and ``free`` from a client or a task.
"""
