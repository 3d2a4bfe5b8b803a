"""`make bench`: how fast the plugin forwards to KHEOPS, against the alternatives, on this machine.

Every figure is a ratio between runs of one invocation, against one KHEOPS test server process
and one generated corpus, so that the verdict does not depend on how fast the machine is.
"""
