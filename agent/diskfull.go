package agent

import (
	"errors"
	"fmt"
	"syscall"
	"time"
)

// CondDiskFull: a file system the agent writes to (the state directory's,
// the spool's) has no space or no inodes left. Nothing is lost meanwhile:
// application messages wait in the spool directory (a spool file is
// deleted only after the hub acknowledged its message), and status.json is
// overwritten in place. The condition clears by itself once there is room
// for a whole message again, and the waiting files are sent without a
// restart.
const CondDiskFull Condition = "disk-full"

// diskCheckEvery is how often the agent looks whether space was freed
// while CondDiskFull is raised (a statfs, nothing written).
const diskCheckEvery = 5 * time.Second

// noSpace reports whether err says a file system is full (or the quota used up).
func noSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

func diskFullReason(dir string) string {
	return fmt.Sprintf("no space left on the file system of %s; free space there (df -h %s; df -i %s for inodes): "+
		"application messages wait in the spool directory and are sent once there is room; "+
		"a certificate renewal or provisioning that needs room is retried then (the current certificate stays in use)", dir, dir, dir)
}

// noteNoSpace raises CondDiskFull if err says the file system of dir is
// full, and reports whether it did.
func (a *Agent) noteNoSpace(dir string, err error) bool {
	if !noSpace(err) {
		return false
	}
	if !a.diskFull() { // the first directory found full names it
		a.status.Raise(CondDiskFull, diskFullReason(dir))
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
		if ok, err := hasRoom(dir, hubMessageLimit, 16); !ok || err != nil {
			return false
		}
	}
	a.status.Clear(CondDiskFull)
	return true
}

// hasRoom reports whether the file system of dir has at least bytes and
// inodes free (a file system without an inode count has inodes enough).
func hasRoom(dir string, bytes, inodes uint64) (bool, error) {
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		return false, err
	}
	return uint64(fs.Bavail)*uint64(fs.Bsize) >= bytes && (fs.Files == 0 || fs.Ffree >= inodes), nil
}
