"""Test doubles of the engines pymw_magic's batch backends talk to.

``pymw_magic.testing.condor.StandInSchedd`` is a faithful stand-in of an
HTCondor schedd (a daemon process of its own that really runs each job),
for CI and for users without a pool: pass it as ``schedd=``.  Nothing in
the package's backends imports this package; they cannot tell it from a
real ``htcondor2.Schedd``.
"""
