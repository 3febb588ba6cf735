"""`hived cluster`: data-parallel training on Ray Train, alone or as one hive peer.

Ray does the scheduling, the process group, the restarts and the checkpoint storage; this
package only says what each worker runs (``worker_loop``), carries what rank 0 reports to the
daemon (``mailbox``), and drives both from the daemon that serves the dashboard (``driver``).
Ray is imported here and nowhere else, so the other commands start without it.
"""
