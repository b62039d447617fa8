package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
)

// ErrAlreadyRunning says another gwagent process holds the state directory.
var ErrAlreadyRunning = errors.New("already running")

// lockFile is the file in the state directory that one process at a time
// holds an exclusive flock on. It holds the holder's pid for messages; the
// lock itself, not the pid, is what counts (the kernel drops it when the
// process dies, even by SIGKILL).
const lockFile = "gwagent.lock"

// StateLock is the exclusive hold of one process on a state directory: two
// agents on one identity and one outbox knock each other off the hub and
// send everything twice.
type StateLock struct {
	f *os.File
}

// LockStateDir takes the state directory for this process, creating it
// (0700) if needed. If another process holds it, the error wraps
// ErrAlreadyRunning and names its pid.
func LockStateDir(dir string) (*StateLock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		if errors.Is(err, syscall.EROFS) {
			return nil, fmt.Errorf("state directory: %w; state_dir must be on writable storage (the packages use /var/lib/gwagent)", err)
		}
		return nil, fmt.Errorf("state directory: %w; create it or fix state_dir", err)
	}
	p := filepath.Join(dir, lockFile)
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
		// LockHolder (gwagent status) holds a shared lock for an instant.
		time.Sleep(20 * time.Millisecond)
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
	return &StateLock{f: f}, nil
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
func (l *StateLock) Unlock() {
	if l != nil && l.f != nil {
		l.f.Close() // closing the last descriptor drops the flock
		l.f = nil
	}
}

// LockHolder reports the pid of the process holding the state directory:
// 0 if none does, -1 if one does but its pid is not written yet. It only
// needs read access to the lock file; an error means it could not tell.
func LockHolder(dir string) (int, error) {
	f, err := atomicfile.OpenRegular(filepath.Join(dir, lockFile), syscall.O_NOFOLLOW, 0)
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
