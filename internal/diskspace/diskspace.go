// Package diskspace tells a full file system from other write errors and
// measures the room left, for the parts of the agent that must keep working
// (and say so) on a full disk, and raises and clears condition.DiskFull for
// them. A leaf: no state; of gwagent's it imports only the condition leaf.
package diskspace

import (
	"errors"
	"fmt"
	"syscall"
)

// NoSpace reports whether err says a file system is full (or the quota used up).
func NoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// HasRoom reports whether the file system of dir has at least bytes and
// inodes free (a file system without an inode count has inodes enough).
func HasRoom(dir string, bytes, inodes uint64) (bool, error) {
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		return false, err
	}
	return uint64(fs.Bavail)*uint64(fs.Bsize) >= bytes && (fs.Files == 0 || fs.Ffree >= inodes), nil
}

// Reason is the disk-full condition's text for the file system of dir:
// what is full, how to look, and that nothing is lost meanwhile.
func Reason(dir string) string {
	return fmt.Sprintf("no space left on the file system of %s; free space there (df -h %s; df -i %s for inodes): "+
		"application messages wait in the spool directory and are sent once there is room; "+
		"a certificate renewal or provisioning that needs room is retried then (the current certificate stays in use)", dir, dir, dir)
}
