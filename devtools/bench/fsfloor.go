package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/internal/mounts"
)

// spoolFloor is the least CPU a spool message costs in file-system work,
// with no MQTT at all: n files like the drain's, in a directory on the
// spool's file system, each opened, stat'ed, read and closed (take: the
// agent does it when the file arrives, before the outage ends), then
// stat'ed and unlinked through a directory descriptor (retire: the agent
// does it after the PUBACK, within the drain's CPU figure), the files
// written to disk first, as the drain's are. The plain paho
// reference pays none of it, so it sets how close to that reference an
// agent that takes its messages from files can come. Measured on one
// locked thread, so the CPU is this work's alone (azsim runs in the
// bench's process).
func spoolFloor(dir string, n int) (take, retire time.Duration, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(dir)
	pad := strings.Repeat("x", 60)
	for i := 0; i < n; i++ {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("m%05d.json", i)), []byte(fmt.Sprintf(`{"k":%d,"drain":true,"pad":%q}`, i, pad)), 0o644); err != nil {
			return 0, 0, err
		}
	}
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("m%05d.json", i)
	}
	// On disk, as the drain's spool files are, their metadata committed by
	// the journal (ext4 commits every 5 s).
	if err := writeBack(dir, names); err != nil {
		return 0, 0, err
	}
	time.Sleep(6 * time.Second)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, 0, err
	}
	defer unix.Close(dfd)
	buf := make([]byte, 4096)
	var st unix.Stat_t
	t0 := threadCPU()
	for _, name := range names {
		fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
		if err != nil {
			return 0, 0, err
		}
		unix.Fstat(fd, &st)
		unix.Read(fd, buf)
		unix.Close(fd)
	}
	t1 := threadCPU()
	for _, name := range names {
		unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW)
		if err := unix.Unlinkat(dfd, name, 0); err != nil {
			return 0, 0, err
		}
	}
	t2 := threadCPU()
	return (t1 - t0) / time.Duration(n), (t2 - t1) / time.Duration(n), nil
}

// threadCPU is the calling thread's user and system time.
func threadCPU() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_THREAD, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// mountOf says which file system dir is on: its type and mount options
// (discard, say), which decide much of what deleting a file costs.
func mountOf(dir string) string {
	if r, err := filepath.EvalSymlinks(dir); err == nil {
		dir = r
	}
	m, err := mounts.Of(mounts.Table, dir)
	if err != nil {
		return "unknown file system"
	}
	return m.String()
}

// writeBack writes the named files of dir to disk and waits for it
// (sync_file_range), as the kernel's writeback does for files older than
// 30 s: their blocks are allocated and written. Not sync(2): that would
// write back what the agents beside (the memory and flash window) have
// dirtied too, and change their figures.
func writeBack(dir string, names []string) error {
	for _, name := range names {
		fd, err := unix.Open(filepath.Join(dir, name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		err = unix.SyncFileRange(fd, 0, 0, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("writing %s back: %w", name, err)
		}
	}
	return nil
}
