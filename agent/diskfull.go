package agent

import (
	"time"

	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/diskspace"
	"github.com/gwagent/gwagent/telemetry"
)

// CondDiskFull: a file system the agent writes to (the state directory's,
// the spool's) has no space or no inodes left. Nothing is lost meanwhile:
// application messages wait in the spool directory (a spool file is
// deleted only after the hub acknowledged its message), and status.json is
// overwritten in place. The condition clears by itself once there is room
// for a whole message again, and the waiting files are sent without a
// restart.
const CondDiskFull = condition.DiskFull

// diskCheckEvery is how often a renewal waiting for room looks whether
// space was freed while CondDiskFull is raised (a statfs, nothing written);
// the telemetry pipeline looks as often for the spool.
const diskCheckEvery = 5 * time.Second

// noteNoSpace raises CondDiskFull if err says the file system of dir is
// full, and reports whether it did.
func (a *Agent) noteNoSpace(dir string, err error) bool {
	return diskspace.Note(a.status, dir, err)
}

// diskFull reports whether CondDiskFull is raised.
func (a *Agent) diskFull() bool {
	return a.status.Has(CondDiskFull)
}

// roomAgain clears CondDiskFull once the file systems of the state and
// spool directories each have room for a whole message and a few files,
// and reports whether it did.
func (a *Agent) roomAgain() bool {
	cfg := a.cfg.Load()
	return diskspace.ClearWhenRoom(a.status, telemetry.MaxMessageBytes, 16, cfg.StateDir, cfg.Telemetry.SpoolDir)
}
