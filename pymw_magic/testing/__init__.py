"""Test doubles of the engines pymw_magic's batch backends talk to.

``pymw_magic.testing.condor.StandInSchedd`` is a faithful stand-in of an
HTCondor schedd (a daemon process of its own that really runs each job),
for CI and for users without a pool: pass it as ``schedd=``.
``pymw_magic.testing.boinc.StandInProject`` is one of a BOINC project: a
project directory with BOINC's tools and a daemon playing the server and
its volunteers; pass its directory as ``project_home=``.  Nothing in the
package's backends imports this package; they cannot tell these from a
real schedd or project.
"""
