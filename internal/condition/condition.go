// Package condition names the agent's health problems (tailscale's
// health.Warnable idea) and the one interface through which the parts of the
// agent raise and clear them. The agent's status tracker is the Sink; the
// telemetry pipeline and renewal are handed it, so STATUS=, the log,
// `gwagent status` and health messages keep reading from one place.
// A leaf: no state, nothing of gwagent's imported.
package condition

// Name is a condition's stable, user-visible name ("disk-full").
type Name string

// Sink raises and clears conditions. Raise with a reason that says what is
// wrong and what to do; raising a raised condition updates its reason.
type Sink interface {
	Raise(c Name, reason string)
	Clear(c Name)
	Has(c Name) bool
}

// DiskFull: a file system the agent writes to (the state directory's, the
// spool's) has no space or no inodes left. Raised by whichever part of the
// agent meets it first, cleared once there is room again.
const DiskFull Name = "disk-full"

// Throttled: DPS or the hub is throttling the device (429, or CONNACK 3
// which the hub also sends at its connection-rate limit); gwagent waits as
// asked (retry-after) or backs off, never in a tight loop. Raised by the
// part of the agent that was throttled (lifecycle, twin).
const Throttled Name = "throttled"
