package agent

import (
	"time"

	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/diskspace"
)

// CondDiskFull: a file system the agent writes to (the state directory's,
// the spool's) has no space or no inodes left. Nothing is lost meanwhile:
// application messages wait in the spool directory (a spool file is
// deleted only after the hub acknowledged its message), and status.json is
// overwritten in place. The condition clears by itself once there is room
// for a whole message again, and the waiting files are sent without a
// restart.
const CondDiskFull = condition.DiskFull

// diskCheckEvery is how often the agent looks whether space was freed
// while CondDiskFull is raised (a statfs, nothing written).
const diskCheckEvery = 5 * time.Second

// noteNoSpace raises CondDiskFull if err says the file system of dir is
// full, and reports whether it did.
func (a *Agent) noteNoSpace(dir string, err error) bool {
	if !diskspace.NoSpace(err) {
		return false
	}
	if !a.diskFull() { // the first directory found full names it
		a.status.Raise(CondDiskFull, diskspace.Reason(dir))
	}
	return true
}

// repeatedNoSpace notes err like noteNoSpace and reports whether it is a
// no-space error that disk-full already announced: the caller then logs it
// at debug level instead of repeating, many times a second, what the
// condition says once.
func (a *Agent) repeatedNoSpace(dir string, err error) bool {
	was := a.diskFull()
	return a.noteNoSpace(dir, err) && was
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
	for _, dir := range []string{cfg.StateDir, cfg.Telemetry.SpoolDir} {
		if ok, err := diskspace.HasRoom(dir, hubMessageLimit, 16); !ok || err != nil {
			return false
		}
	}
	a.status.Clear(CondDiskFull)
	return true
}
