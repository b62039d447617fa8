// Package statelock gives one process at a time the state directory: an
// exclusive flock on STATE_DIR/gwagent.lock, which the kernel drops when the
// process dies (even by SIGKILL). Two agents on one identity and one outbox
// would knock each other off the hub and send everything twice; `gwagent
// provision`, `renew` and `onboard` take it too, and `gwagent status` asks
// who holds it.
//
// A leaf: it imports only gwagent's other leaves and keeps no state. The
// lock file is never followed through a link, never blocks on a FIFO, and
// is handed to the directory's owner when root creates it.
package statelock

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/clock"
)

// ErrAlreadyRunning says another gwagent process holds the state directory.
var ErrAlreadyRunning = errors.New("already running")

// File is the file in the state directory that one process at a time
// holds an exclusive flock on. It holds the holder's pid for messages; the
// lock itself, not the pid, is what counts (the kernel drops it when the
// process dies, even by SIGKILL).
const File = "gwagent.lock"

// Lock is the exclusive hold of one process on a state directory.
type Lock struct {
	f *os.File
}

// Take takes the state directory for this process, creating it
// (0700) if needed. If another process holds it, the error wraps
// ErrAlreadyRunning and names its pid.
func Take(dir string) (*Lock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		if errors.Is(err, syscall.EROFS) {
			return nil, fmt.Errorf("state directory: %w; state_dir must be on writable storage (the packages use /var/lib/gwagent)", err)
		}
		return nil, fmt.Errorf("state directory: %w; create it or fix state_dir", err)
	}
	p := filepath.Join(dir, File)
	// Readable by all (it holds only a pid), so that whoever runs gwagent
	// can lock it, even if another user created it.
	f, err := atomicfile.OpenRegular(p, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o644)
	if err == nil {
		f.Chmod(0o644) // whatever the umask
	}
	if errors.Is(err, os.ErrPermission) {
		// Left by root (say, `gwagent onboard` at the factory): a read-only
		// descriptor locks just as well; only the pid cannot be written.
		f, err = atomicfile.OpenRegular(p, syscall.O_NOFOLLOW, 0)
	}
	if err != nil {
		return nil, lockOpenError(p, err)
	}
	giveToDirOwner(f, dir)
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	for i := 0; errors.Is(err, syscall.EWOULDBLOCK) && i < 5; i++ {
		// Holder (gwagent status, another process) holds a shared lock
		// for an instant: wait for it in that process's time, the wall
		// clock's.
		clock.Sleep(context.Background(), clock.Real{}, 20*time.Millisecond)
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	}
	if err != nil {
		defer f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("gwagent is %w (pid %d) on %s; stop it first (systemctl stop gwagent) or use another state_dir", ErrAlreadyRunning, readPID(f), dir)
		}
		return nil, fmt.Errorf("state directory lock %s: %w", p, err)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return &Lock{f: f}, nil
}

// lockOpenError says why the lock file could not be opened and what to do.
func lockOpenError(p string, err error) error {
	switch {
	case errors.Is(err, syscall.ELOOP):
		return fmt.Errorf("state directory lock %s is a symbolic link, which gwagent never follows (it could point at any file); remove it", p)
	case errors.Is(err, syscall.EROFS):
		return fmt.Errorf("state directory lock: %w; state_dir must be on writable storage (the packages use /var/lib/gwagent)", err)
	case errors.Is(err, syscall.EISDIR):
		return fmt.Errorf("state directory lock %s is a directory; remove it", p)
	case errors.Is(err, atomicfile.ErrNotRegular):
		return fmt.Errorf("state directory lock: %w", err)
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("state directory lock: %w; run as the user that owns the state directory (the service's user) or as root", err)
	}
	return fmt.Errorf("state directory lock: %w", err)
}

// Unlock releases the state directory.
func (l *Lock) Unlock() {
	if l != nil && l.f != nil {
		l.f.Close() // closing the last descriptor drops the flock
		l.f = nil
	}
}

// Holder reports the pid of the process holding the state directory:
// 0 if none does, -1 if one does but its pid is not written yet. It only
// needs read access to the lock file; an error means it could not tell.
func Holder(dir string) (int, error) {
	f, err := atomicfile.OpenRegular(filepath.Join(dir, File), syscall.O_NOFOLLOW, 0)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err == nil {
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		return 0, nil
	}
	if pid := readPID(f); pid > 0 {
		return pid, nil
	}
	return -1, nil
}

func readPID(f *os.File) int {
	b := make([]byte, 32)
	n, _ := f.ReadAt(b, 0)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b[:n])))
	return pid
}

// giveToDirOwner hands a lock file root created to the state directory's
// owner (the service user), so the service can write its pid in it later.
func giveToDirOwner(f *os.File, dir string) {
	if os.Geteuid() != 0 {
		return
	}
	var d, st syscall.Stat_t
	if syscall.Stat(dir, &d) != nil || syscall.Fstat(int(f.Fd()), &st) != nil {
		return
	}
	if st.Uid != d.Uid || st.Gid != d.Gid {
		f.Chown(int(d.Uid), int(d.Gid))
	}
}
