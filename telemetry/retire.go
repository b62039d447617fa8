package telemetry

import (
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/internal/dirwatch"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// Retirement: a spool file whose message the hub acknowledged leaves the
// spool, but not on the ack path. The acker records the PUBACKs and, for
// spool messages, receipts (outbox.Receipt: the file's path and the
// version that was sent) and hands the receipts to the retirer goroutine,
// which unlinks the files, in batches of whatever has accumulated, while
// the drain goes on.
//
// What a crash may do in between is decided by whether the receipts were
// written (outbox.Deliver, in the same write as the acks):
//   - Written: a file still in the spool after a crash is found by its
//     receipt at start (loadQueued) and removed, never sent again.
//   - Not written: what a message delivered from memory in steady
//     operation does (an ack that writes nothing, a retirer that is not
//     behind): the file goes within milliseconds, and only a crash in
//     those milliseconds sends it again (with the same message id).
//
// A receipt is written whenever the acks are written anyway (then it rides
// in the same write) or the retirer is behind (a backlog drains): there,
// files wait in the spool long enough for a crash to matter. At one
// message a second nothing is written for retirement, and a file is
// unlinked before its data or its directory entry reach the flash: an
// ext4 file created and removed within the kernel's writeback delay costs
// the flash nothing, where one removed half a minute later costs about a
// kilobyte (bench).
//
// A file is unlinked only if it is still the version that was sent: its
// device, inode, size and modification time (dirwatch.Sig, the spool's
// identity of a file). A file written anew under the same name is a new
// message and stays; the spool loop queues it. Files remain in the set of
// queued spool files until they are gone, so the spool loop never queues
// a delivered file again while it waits.
//
// Older versions renamed delivered files into sent/ and emptied it in the
// background; a sent/ they left is emptied and removed at start (what is
// in it was delivered).

// retireQueue is shared by the acker (which adds receipts) and the retirer
// goroutine (which removes the files).
type retireQueue struct {
	mu    sync.Mutex
	queue []outbox.Receipt // oldest first
	kick  chan struct{}
	// waiting counts receipts added and not yet retired, those being
	// retired included: the acker's measure of whether the retirer is
	// behind.
	waiting atomic.Int64
	// The retirer's own: the directory it removes files from, open, and
	// whether it is on a local file system (raw unlinks, see unlinkat).
	dir string
	dfd int
	raw bool
	// cbuf holds the name of the file at hand NUL-terminated for the raw
	// calls, so that no call allocates.
	cbuf []byte
}

// add queues receipts for the retirer.
func (q *retireQueue) add(rs []outbox.Receipt) {
	if len(rs) == 0 {
		return
	}
	q.waiting.Add(int64(len(rs)))
	q.mu.Lock()
	q.queue = append(q.queue, rs...)
	q.mu.Unlock()
	select {
	case q.kick <- struct{}{}:
	default:
	}
}

// behind reports whether more than n receipts wait for the retirer.
func (q *retireQueue) behind(n int) bool { return q.waiting.Load() > int64(n) }

// take returns what is queued, oldest first, and empties the queue.
func (q *retireQueue) take() []outbox.Receipt {
	q.mu.Lock()
	defer q.mu.Unlock()
	rs := q.queue
	q.queue = nil
	return rs
}

// closeDir closes the retirer's directory descriptor.
func (q *retireQueue) closeDir() {
	if q.dir != "" {
		unix.Close(q.dfd)
		q.dir = ""
	}
}

// dirFD returns a descriptor of dir, opened anew when dir is another
// directory than the one open or the directory at that path was made
// anew. The retirer's goroutine only.
func (q *retireQueue) dirFD(dir string) (int, error) {
	if q.dir == dir {
		var a, b unix.Stat_t
		if unix.Fstat(q.dfd, &a) == nil && unix.Stat(dir, &b) == nil && a.Dev == b.Dev && a.Ino == b.Ino {
			return q.dfd, nil
		}
	}
	q.closeDir()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	q.dir, q.dfd, q.raw = dir, fd, localFS(fd)
	return fd, nil
}

// unlinkat removes name from the directory the retirer has open. On a
// local file system the call is made without telling Go's scheduler (a
// raw system call). Deleting a spool file whose blocks are on disk (any
// file that waited out an outage of more than the kernel's 30 s writeback
// delay) takes 15-150 us: freeing its blocks, and with online discard a
// synchronous TRIM. The scheduler takes the processor from a goroutine
// that has been in a system call for 20 us and hands it to another
// thread, so every such unlink moved the drain's goroutines from thread to
// thread and kept the scheduler's monitor waking every 20 us: in make
// bench's drain of 20,000 such files the agent's median rounds took 56-71
// us of CPU per message with scheduled unlinks and 36-37 us with raw ones
// (three runs each, the same build otherwise, the same file system). The
// price: the agent runs Go code on one processor, so its other goroutines
// wait while an unlink runs (tens of microseconds), and for the retirer's
// turn on the processor (at most 10 ms, Go's preemption) while it works
// through a batch; a gateway sends a few messages a second. On a file system that
// can hang (network, FUSE), a raw call could stop the whole agent: there
// the scheduler is told.
func (q *retireQueue) unlinkat(dfd int, name string) error {
	if !q.raw {
		return unix.Unlinkat(dfd, name, 0)
	}
	p, err := q.cname(name)
	if err != nil {
		return err
	}
	if _, _, e := unix.RawSyscall(unix.SYS_UNLINKAT, uintptr(dfd), uintptr(unsafe.Pointer(p)), 0); e != 0 {
		return e
	}
	return nil
}

// lstatat describes name in the directory the retirer has open, without
// following a symbolic link: raw, as unlinkat, where the architecture's
// call is known (sysFstatat), and without allocating. It is the other
// system call the retirer makes for every file (the check that the file
// is still the version that was delivered).
func (q *retireQueue) lstatat(dfd int, name string, st *unix.Stat_t) error {
	if !q.raw || !rawFstatat {
		return unix.Fstatat(dfd, name, st, unix.AT_SYMLINK_NOFOLLOW)
	}
	p, err := q.cname(name)
	if err != nil {
		return err
	}
	if _, _, e := unix.RawSyscall6(uintptr(sysFstatat), uintptr(dfd), uintptr(unsafe.Pointer(p)), uintptr(unsafe.Pointer(st)), unix.AT_SYMLINK_NOFOLLOW, 0, 0); e != 0 {
		return e
	}
	return nil
}

// cname returns name NUL-terminated in the retirer's buffer.
func (q *retireQueue) cname(name string) (*byte, error) {
	if strings.IndexByte(name, 0) >= 0 {
		return nil, unix.EINVAL
	}
	q.cbuf = append(append(q.cbuf[:0], name...), 0)
	return &q.cbuf[0], nil
}

// localFS reports whether the directory fd is on a file system on this
// machine's own storage or memory: ext2/3/4, f2fs, XFS, Btrfs, UBIFS,
// JFFS2, tmpfs, ramfs or overlayfs. Anything else, and a failed statfs,
// counts as one that may hang.
func localFS(fd int) bool {
	var st unix.Statfs_t
	if unix.Fstatfs(fd, &st) != nil {
		return false
	}
	switch uint32(st.Type) {
	case unix.EXT4_SUPER_MAGIC, unix.F2FS_SUPER_MAGIC, unix.XFS_SUPER_MAGIC, unix.BTRFS_SUPER_MAGIC, ubifsMagic,
		unix.JFFS2_SUPER_MAGIC, unix.TMPFS_MAGIC, unix.RAMFS_MAGIC, unix.OVERLAYFS_SUPER_MAGIC:
		return true
	}
	return false
}

// ubifsMagic is UBIFS's statfs type (linux/magic.h), which x/sys lacks.
const ubifsMagic = 0x24051905

// retireQueued removes the files of every queued receipt, until the queue
// is empty.
func (p *Pipeline) retireQueued() {
	for {
		rs := p.retire.take()
		if len(rs) == 0 {
			return
		}
		stuck := p.retireFiles(rs)
		done := p.keepStuck(rs, stuck)
		// Said once their receipts are written: a crash right after the
		// warning does not send them again.
		for _, path := range slices.Sorted(maps.Keys(stuck)) {
			err := stuck[path]
			p.log.Warn("cannot delete sent spool file; it stays in the spool and is not sent again", "file", path, "err", err)
		}
		p.outbox.Retired(done...)
		p.retire.waiting.Add(-int64(len(rs)))
	}
}

// retireFiles unlinks the files of rs that are still the version sent,
// then forgets them as queued spool files. One it cannot unlink stays
// queued, so it is not sent again and again (a file made immutable, say):
// kept (keepStuck), warned about, and tried again after a restart. It
// returns those, with why.
func (p *Pipeline) retireFiles(rs []outbox.Receipt) (stuck map[string]error) {
	dfd, dir := -1, ""
	for _, r := range rs {
		d, name := filepath.Split(r.Path)
		d = filepath.Clean(d)
		if d != dir {
			var err error
			dir = d
			if dfd, err = p.retire.dirFD(d); err != nil {
				if !errors.Is(err, os.ErrNotExist) {
					p.log.Warn("cannot remove delivered spool files", "dir", d, "err", err)
				}
				dfd = -1
			}
		}
		if dfd < 0 {
			continue
		}
		var st unix.Stat_t
		if err := p.retire.lstatat(dfd, name, &st); err != nil {
			continue // gone already
		}
		if sigOfUnix(&st) != sigOf(r.ID) {
			p.log.Debug("spool file replaced while its message was in flight; the new version is sent too", "file", r.Path)
			continue
		}
		if err := p.retire.unlinkat(dfd, name); err != nil && !errors.Is(err, unix.ENOENT) {
			if stuck == nil {
				stuck = map[string]error{}
			}
			stuck[r.Path] = err
		}
	}
	p.queued.mu.Lock()
	for _, r := range rs {
		if sig, ok := p.queued.sigs[r.Path]; ok && sig == sigOf(r.ID) && stuck[r.Path] == nil {
			delete(p.queued.sigs, r.Path)
		}
	}
	p.queued.mu.Unlock()
	return stuck
}

// keepStuck makes sure the receipt of every file that could not be removed
// survives a crash, so that the next start tries again instead of sending
// it again: a receipt held in memory (a lone delivery) is written now, and
// none of them is passed to Retired, which would let its record go. It
// returns the receipts that may be retired.
func (p *Pipeline) keepStuck(rs []outbox.Receipt, stuck map[string]error) []outbox.Receipt {
	if len(stuck) == 0 {
		return rs
	}
	var done, held []outbox.Receipt
	for _, r := range rs {
		switch {
		case stuck[r.Path] == nil:
			done = append(done, r)
		case !r.Written():
			held = append(held, r)
		}
	}
	if len(held) > 0 {
		if _, err := p.outbox.Deliver(nil, held, false); err != nil {
			p.log.Warn("cannot record delivered spool files that could not be removed; after a restart they are sent again", "err", err)
		}
	}
	return done
}

// sigOf and fileID convert between the spool's identity of a file version
// and the outbox's.
func sigOf(id outbox.FileID) dirwatch.Sig {
	return dirwatch.Sig{Dev: id.Dev, Ino: id.Ino, Size: id.Size, Mtime: id.Mtime}
}

func fileID(s dirwatch.Sig) outbox.FileID {
	return outbox.FileID{Dev: s.Dev, Ino: s.Ino, Size: s.Size, Mtime: s.Mtime}
}

func sigOfUnix(st *unix.Stat_t) dirwatch.Sig {
	return dirwatch.Sig{Dev: st.Dev, Ino: st.Ino, Size: st.Size, Mtime: st.Mtim.Nano()}
}

// oldSentDir is where older versions moved delivered spool files.
const oldSentDir = "sent"

// removeOldSent empties and removes the sent/ an older version left in
// the spool directory dir: everything in it was delivered. Only the
// agent's own directory is touched: a member of the spool group may have
// made sent/ (as a link, or a directory of its own), and then it is left
// alone.
func (p *Pipeline) removeOldSent(dir string) {
	path := filepath.Join(dir, oldSentDir)
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil || int(st.Uid) != os.Geteuid() || st.Mode&0o077 != 0 {
		p.log.Debug("leaving alone a sent/ the agent did not make", "dir", path)
		return
	}
	n := 0
	for {
		names, err := f.Readdirnames(256)
		for _, name := range names {
			if unix.Unlinkat(fd, name, 0) == nil {
				n++
			}
		}
		if err != nil || len(names) == 0 {
			break
		}
	}
	if err := unix.Rmdir(path); err != nil && !errors.Is(err, unix.ENOENT) {
		p.log.Warn("cannot remove the sent/ directory of an older version", "dir", path, "err", err)
		return
	}
	p.log.Info("removed the sent/ directory of an older version; delivered spool files now leave the spool directly", "dir", path, "files", n)
}
