package telemetry

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
	"golang.org/x/sys/unix"
)

// A spool file whose message the hub acknowledged is renamed into sent/
// inside the spool directory, and a sweeper goroutine unlinks what is
// there. Unlinking is the slow part: on ext4 mounted with "discard" (usual
// on eMMC and SD gateways) each unlink of a written file waits for the
// device to discard its blocks, about 1,000–2,500 per second on the bench
// machine, while a rename within the filesystem runs at 20,000 or more.
// Deleting inline made the drain run at the disk's unlink pace instead of
// the hub's. For the application nothing changes: its file leaves the
// spool once its message is delivered. After a crash, files still in
// sent/ are removed at start, never sent again.
const spoolSentDir = "sent"

// sentFiles is shared by the drain's retirement (which renames into sent/)
// and the sweeper (which empties it).
type sentFiles struct {
	mu    sync.Mutex
	dir   string    // the spool directory dfd and sfd belong to
	dfd   int       // the spool directory
	sfd   int       // its sent/ directory, or -1 when it cannot be used
	tried time.Time // when sent/ was last found unusable
	kick  chan struct{}
}

// replaced reports whether the spool directory dfd was opened on has been
// removed and made again under its path: renames through the old
// descriptors would fail (and files be deleted in place) from then on.
func (s *sentFiles) replaced() bool {
	var a, b unix.Stat_t
	if unix.Fstat(s.dfd, &a) != nil || unix.Stat(s.dir, &b) != nil {
		return false
	}
	return a.Dev != b.Dev || a.Ino != b.Ino
}

// sentRetry is how often an unusable sent/ is tried again (it may have
// failed for a full disk, or an administrator removed a stray one).
const sentRetry = time.Minute

func (s *sentFiles) closeLocked() {
	if s.dir != "" {
		unix.Close(s.dfd)
		if s.sfd >= 0 {
			unix.Close(s.sfd)
		}
	}
	s.dir = ""
}

// openSent opens dir/sent without following a link and checks that the
// agent owns it and nobody else may write it, creating it when absent. A
// member of the spool group could have made it first, as a link or as
// its own directory; then the agent does not use it (files are deleted
// in place, as before) and says why.
func openSent(dir string) (int, error) {
	p := filepath.Join(dir, spoolSentDir)
	fd, st, err := openOwnDir(p, 0o700)
	if err != nil {
		return -1, err
	}
	if st.Mode&0o077 != 0 {
		unix.Close(fd)
		return -1, fmt.Errorf("%s has mode %04o, not 0700; remove it, the agent makes its own", p, st.Mode&0o7777)
	}
	return fd, nil
}

// openOwnDir opens the directory p, making it with mode if it is absent,
// without following a link, and checks that the agent owns it: a member
// of the spool group may have made it first (as a link, or as its own
// directory), and then the agent must not put files there.
func openOwnDir(p string, mode os.FileMode) (int, unix.Stat_t, error) {
	var st unix.Stat_t
	if err := os.Mkdir(p, mode); err != nil && !errors.Is(err, os.ErrExist) {
		return -1, st, err
	}
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, st, fmt.Errorf("%s is not a directory the agent may use (%w); remove it, the agent makes its own", p, err)
	}
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, st, err
	}
	if int(st.Uid) != os.Geteuid() {
		unix.Close(fd)
		return -1, st, fmt.Errorf("%s is owned by uid %d, not by the agent; remove it, the agent makes its own", p, st.Uid)
	}
	return fd, st, nil
}

// sentFor returns the descriptors for dir, opening them when dir is new
// (or, once a sentRetry has passed, when sent/ was unusable). sfd is -1
// when sent/ cannot be used. The caller holds p.sent.mu.
func (p *Pipeline) sentFor(dir string) (dfd, sfd int, err error) {
	s := &p.sent
	if s.dir == dir && (s.sfd >= 0 || clock.Since(p.clock, s.tried) < sentRetry) && !s.replaced() {
		return s.dfd, s.sfd, nil
	}
	warned := s.dir == dir
	s.closeLocked()
	dfd, err = unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, -1, err
	}
	sfd, err = openSent(dir)
	if err != nil {
		s.tried = p.clock.Now()
		if !warned {
			p.log.Warn("sent spool files are deleted in place, which is slower on some disks", "err", err)
		}
	}
	s.dir, s.dfd, s.sfd = dir, dfd, sfd
	return dfd, sfd, nil
}

// retire takes a sent spool file out of the spool: a rename into sent/
// for the sweeper, or an unlink when that is not possible (sent/ unusable,
// or no room for a directory entry on a full disk).
func (p *Pipeline) retire(path string) {
	dir, name := filepath.Split(path)
	dir = filepath.Clean(dir)
	p.sent.mu.Lock()
	dfd, sfd, err := p.sentFor(dir)
	if err == nil && sfd >= 0 {
		err = unix.Renameat(dfd, name, sfd, name)
		if err == nil {
			p.sent.mu.Unlock()
			select {
			case p.sent.kick <- struct{}{}:
			default:
			}
			return
		}
	}
	p.sent.mu.Unlock()
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		p.log.Warn("cannot delete sent spool file", "file", path, "err", err)
	}
}

// sweepSent empties sent/ whenever files are moved there, and once at
// start for what a crash left behind; and it keeps rejected/ to its bounds
// (rejected.go) after each refusal and at start.
func (p *Pipeline) sweepSent(ctx context.Context) {
	defer func() {
		p.sent.mu.Lock()
		p.sent.closeLocked()
		p.sent.mu.Unlock()
	}()
	p.sent.mu.Lock()
	p.sentFor(p.o.Spool().Dir)
	p.sent.mu.Unlock()
	p.pruneRejected(p.o.Spool().Dir)
	for {
		p.sweepOnce(ctx)
		select {
		case <-ctx.Done():
			return
		case <-p.sent.kick:
		case <-p.prune:
			p.pruneRejected(p.o.Spool().Dir)
		}
	}
}

func (p *Pipeline) sweepOnce(ctx context.Context) {
	p.sent.mu.Lock()
	if p.sent.dir == "" || p.sent.sfd < 0 {
		p.sent.mu.Unlock()
		return
	}
	// A descriptor of its own for reading, so the rename side keeps its.
	fd, err := unix.Openat(p.sent.sfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	dir := filepath.Join(p.sent.dir, spoolSentDir)
	p.sent.mu.Unlock()
	if err != nil {
		return
	}
	d := os.NewFile(uintptr(fd), spoolSentDir)
	defer d.Close()
	for ctx.Err() == nil {
		names, err := d.Readdirnames(256)
		for _, n := range names {
			if err := unix.Unlinkat(fd, n, 0); err != nil && !errors.Is(err, unix.ENOENT) {
				p.log.Warn("cannot delete sent spool file", "file", filepath.Join(dir, n), "err", err)
			}
		}
		if err != nil || len(names) == 0 { // io.EOF at the end
			return
		}
	}
}
