// Package telemetry is gwagent's telemetry pipeline: everything between a
// local application's spool file (or a message the agent makes) and the
// hub's PUBACK.
//
//	spool dir ──► intake (spool.go) ──┐
//	                                  ├─► outbox (durable, outbox/) ──► drain (drain.go) ──► Publisher (the hub session)
//	Enqueue (health) ─────────────────┘                                   │ PUBACKs, in order
//	                          outbox acks + receipts ◄── delivered ◄───┘
//	                                                           └─► retirer: spool file unlinked (retire.go)
//
// It owns: spool intake (the directory watch, raw inotify so renamed-in
// files are taken at once, with its polling fallback; the settle rule, the
// checks on every file, rejected/ and its bounds), the outbox, the
// sliding-window drain with batched acks, the retirement of delivered spool
// files off the ack path (receipts in the outbox, so it may trail behind
// in batches), disk-full handling on this path (it raises and
// clears condition.DiskFull and looks for room again every 5 s),
// the backlog signal, and queueing of the agent's own messages (Enqueue).
//
// Its seams are small: a Publisher (what transport.Session offers for
// telemetry; optionally its Done and Requests, which tell a connection the
// hub ended with nothing answered), a condition.Sink for its conditions, a
// clock.Clock for every timer, the send settings in effect (Sending), and
// the agent's *slog.Logger: as a part of the agent it logs, like agent
// does; it keeps no package state.
//
// Goroutines and what they own:
//   - Run's spool loop owns the watcher, the files waiting to settle or to
//     be moved aside, and the settle, rescan and disk-full timers. It shares
//     the set of queued spool files with the retirer (a mutex): a file
//     stays in it until it is removed.
//   - Run's spool loop also owns the spool watch; its inotify reader
//     goroutine ends when the watch is closed or replaced.
//   - Run's retirer unlinks delivered spool files as the acker queues their
//     receipts (a mutex) and keeps rejected/ to its bounds; Close removes
//     what is still queued.
//   - Drain, one per hub session, runs the sender on the caller's goroutine
//     and starts the acker, which ends before it returns.
//   - Enqueue may be called from any goroutine; the outbox serializes, and
//     its write-behind timer runs on the clock's AfterFunc.
//
// Living within the hub's limits (issue 19) happens where a message
// leaves, in the drain's publish step (drain.go): every publish takes a
// token of the send budget (pacer.go: [telemetry] max_rate, halved when
// PUBACKs come late or the hub closes the connection after that, raised
// again by quick PUBACKs; condition telemetry-throttled); health messages
// go ahead of a backlog; consecutive small JSON messages with the same
// properties may travel packed as one array (pack.go); and a session the
// hub closes with nothing answered, as it does over its daily quota, raises
// hub-quota-exceeded and holds connections back to one probe per 10-15
// minutes plus one after 00:00 UTC (quota.go: ConnectAfter for the agent's
// reconnect loop, HubTakes for the twin and renewal, which must not close
// the connection either).
//
// Importers: agent (the one that runs a pipeline), and tests. It imports
// the outbox, gwagent's leaves (clock, condition, diskspace, dirwatch) and
// nothing of transport: the session reaches it only as a Publisher.
package telemetry
