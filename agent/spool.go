package agent

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/fsnotify/fsnotify"
	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/transport"
)

// The spool directory is local applications' inbox. Its rules (README,
// "Sending your own messages") are enforced here:
//
//   - Only *.json names not starting with '.' are considered, so a writer
//     can use a temporary name and rename it into place.
//   - Only regular files are read: symbolic links, FIFOs, devices and
//     directories are refused without being opened or followed.
//   - A file is taken once it has settled: unchanged for [telemetry]
//     spool_settle (default 1s), judged by its modification time or, when
//     that is in the future, by watching it. This protects applications that
//     write in place in several chunks.
//   - Its size is checked before it is read, against the hub's limit for a
//     whole message (body plus properties).
//   - The content must be valid UTF-8 JSON.
//
// A refused file is moved to rejected/ inside the spool directory, with one
// warning naming it and the reason, and counted in status and health.
// A file is deleted after the hub acknowledged it; a later file with the
// same name is a new message.

// hubMessageLimit is IoT Hub's limit for one device-to-cloud message: body
// plus the names and values of its properties.
const hubMessageLimit = 256 << 10

// spoolRejectedDir is where refused files go, inside the spool directory.
const spoolRejectedDir = "rejected"

// spoolSystemProps are the properties every spool message carries besides
// its id.
var spoolSystemProps = [...][2]string{{"ct", "application/json"}, {"ce", "utf-8"}}

// maxSpoolBody is the largest spool file that fits in one hub message with
// the properties the agent adds (mid, ct, ce; the id is "spool-" and 24 hex
// digits). Hub property names are counted with their "$." prefix.
func maxSpoolBody() int64 {
	n := len("$.mid") + len("spool-") + 24
	for _, p := range spoolSystemProps {
		n += len("$.") + len(p[0]) + len(p[1])
	}
	return hubMessageLimit - int64(n)
}

// fileSig identifies one version of one file: a new file under a reused
// name, or a file rewritten in place, has another signature.
type fileSig struct {
	dev, ino uint64
	size     int64
	mtime    int64 // ns
}

func sigOf(st *syscall.Stat_t) fileSig {
	return fileSig{dev: uint64(st.Dev), ino: st.Ino, size: st.Size, mtime: st.Mtim.Nano()}
}

// spoolState is shared by the spool loop (which queues files) and the
// drain (which deletes them after the hub's PUBACK).
type spoolState struct {
	mu     sync.Mutex
	queued map[string]fileSig // path → the version in the outbox
}

// pendingFile is a spool file that has not settled yet.
type pendingFile struct {
	sig  fileSig
	seen time.Time // when this signature was first seen
}

// spooler is the spool loop's own state.
type spooler struct {
	a       *Agent
	dir     string
	pending map[string]pendingFile
	soonest time.Time          // when the earliest pending file may have settled
	refused map[string]fileSig // could not be moved aside: warned once
}

// spoolLoop watches the spool directory for *.json files from local
// applications and queues each as one message; the file is deleted after
// the hub's PUBACK (drain).
func (a *Agent) spoolLoop(ctx context.Context) {
	s := &spooler{a: a, dir: a.cfg.Load().Telemetry.SpoolDir, pending: map[string]pendingFile{}, refused: map[string]fileSig{}}
	w := a.watchDir("spool", CondSpoolPolled, s.dir)
	defer w.close()
	a.loadQueuedSpoolFiles()
	s.scan()
	retry := time.NewTicker(30 * time.Second) // picks up files refused while the outbox was full
	defer retry.Stop()
	// One timer for all pending files, armed for the soonest.
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	var armed time.Time
	resetSettle := func() {
		if len(s.pending) == 0 || s.soonest.IsZero() || s.soonest.Equal(armed) {
			return
		}
		armed = s.soonest
		settle.Reset(max(time.Until(armed), 10*time.Millisecond))
	}
	resetSettle()
	// While a file system is full, look every diskCheckEvery whether space
	// was freed, and then queue what waited at once.
	var diskTick *time.Ticker
	var diskC <-chan time.Time
	defer func() {
		if diskTick != nil {
			diskTick.Stop()
		}
	}()
	watchDisk := func() {
		if diskTick == nil && a.diskFull() {
			diskTick = time.NewTicker(diskCheckEvery)
			diskC = diskTick.C
		}
	}
	watchDisk()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.events():
			if !ok {
				return
			}
			switch {
			case ev.Op&(fsnotify.Remove|fsnotify.Rename) != 0:
				delete(s.pending, ev.Name)
			case ev.Op&(fsnotify.Create|fsnotify.Write|fsnotify.Chmod) != 0:
				s.file(ev.Name)
			}
			resetSettle()
		case err := <-w.errs():
			a.log.Warn("spool watcher", "err", err)
			if errors.Is(err, fsnotify.ErrEventOverflow) {
				// Events were lost (the kernel's queue was full): look
				// at the whole directory now, not at the next retry.
				s.scan()
				resetSettle()
			}
		case <-w.tick():
			w.ticked()
			s.scan()
			resetSettle()
		case <-settle.C:
			armed, s.soonest = time.Time{}, time.Time{}
			for p := range s.pending {
				s.file(p)
			}
			resetSettle()
		case <-diskC:
			if a.roomAgain() {
				diskTick.Stop()
				diskTick, diskC = nil, nil
				s.moveRefused()
				s.scan()
				resetSettle()
			}
		case <-retry.C:
			if nd := a.cfg.Load().Telemetry.SpoolDir; nd != s.dir {
				if err := w.move(nd); err != nil {
					a.log.Error("cannot watch new spool directory", "dir", nd, "err", err)
				} else {
					a.log.Info("spool directory changed", "from", s.dir, "to", nd)
					s.dir = nd
					clear(s.pending)
				}
			}
			s.moveRefused()
			s.scan()
			resetSettle()
		}
		watchDisk()
	}
}

// moveRefused tries again to move aside the refused files that could not
// be moved (say, the disk was full), without warning or counting again.
func (s *spooler) moveRefused() {
	for p, sig := range s.refused {
		var st syscall.Stat_t
		if syscall.Lstat(p, &st) != nil || sigOf(&st) != sig {
			continue // gone or changed: looked at afresh by the scan
		}
		if dst, err := moveAside(s.dir, filepath.Base(p), time.Now()); err == nil {
			delete(s.refused, p)
			s.a.log.Info("refused spool file moved aside now", "file", p, "moved_to", dst)
		}
	}
}

// loadQueuedSpoolFiles notes the spool files already in the outbox (queued
// before a restart), so they are not queued twice.
func (a *Agent) loadQueuedSpoolFiles() {
	a.spool.mu.Lock()
	defer a.spool.mu.Unlock()
	a.spool.queued = map[string]fileSig{}
	var last uint64
	for {
		ms, err := a.outbox.Next(last, 256)
		if err != nil || len(ms) == 0 {
			return
		}
		for _, m := range ms {
			last = m.Seq
			if m.Local == "" {
				continue
			}
			var st syscall.Stat_t
			if syscall.Lstat(m.Local, &st) == nil {
				a.spool.queued[m.Local] = sigOf(&st)
			}
		}
	}
}

// spoolSent is called after the hub acknowledged a spool message: the file
// is deleted unless it was replaced meanwhile (then the new version is a
// new message and stays).
func (a *Agent) spoolSent(path string) {
	a.spool.mu.Lock()
	defer a.spool.mu.Unlock()
	sig, ok := a.spool.queued[path]
	delete(a.spool.queued, path)
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		return // gone already
	}
	if ok && sigOf(&st) != sig {
		a.log.Debug("spool file replaced while its message was in flight; the new version is sent too", "file", path)
		return
	}
	a.retire(path) // spoolsent.go
}

func (s *spooler) scan() {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		s.a.log.Warn("spool directory", "err", err)
		return
	}
	present := make(map[string]bool, len(ents))
	for _, e := range ents {
		p := filepath.Join(s.dir, e.Name())
		present[p] = true
		s.file(p)
	}
	// Forget what is gone, so the maps do not grow with every name ever used.
	for p := range s.refused {
		if !present[p] {
			delete(s.refused, p)
		}
	}
	for p := range s.pending {
		if !present[p] {
			delete(s.pending, p)
		}
	}
	s.a.spool.mu.Lock()
	for p := range s.a.spool.queued {
		if filepath.Dir(p) == s.dir && !present[p] {
			delete(s.a.spool.queued, p)
		}
	}
	s.a.spool.mu.Unlock()
}

// settled decides whether the file with signature sig may be read now. If
// not, it is pending, and s.soonest says when to look at pending files again.
func (s *spooler) settled(path string, sig fileSig) bool {
	settle := s.a.cfg.Load().Telemetry.SpoolSettle.Duration
	now := time.Now() // not opts.Now: compared with file times the kernel sets
	mt := time.Unix(0, sig.mtime)
	if !mt.After(now.Add(-settle)) {
		delete(s.pending, path)
		return true
	}
	p, ok := s.pending[path]
	if !ok || p.sig != sig {
		p = pendingFile{sig: sig, seen: now}
		s.pending[path] = p
	} else if now.Sub(p.seen) >= settle {
		delete(s.pending, path)
		return true
	}
	due := p.seen.Add(settle)
	if m := mt.Add(settle); m.Before(due) {
		due = m // mtime in the past but recent: settles earlier than watched
	}
	if s.soonest.IsZero() || due.Before(s.soonest) {
		s.soonest = due
	}
	return false
}

// file looks at one spool entry and queues, defers or refuses it.
func (s *spooler) file(path string) {
	a := s.a
	name := filepath.Base(path)
	if filepath.Dir(path) != s.dir || strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".json") {
		return
	}
	var lst syscall.Stat_t
	if err := syscall.Lstat(path, &lst); err != nil {
		delete(s.pending, path)
		return // gone already
	}
	a.spool.mu.Lock()
	q, isQueued := a.spool.queued[path]
	a.spool.mu.Unlock()
	if isQueued && q == sigOf(&lst) {
		return
	}
	if sig, ok := s.refused[path]; ok && sig == sigOf(&lst) {
		return
	}
	if kind := fileKind(lst.Mode); kind != "" {
		s.reject(path, sigOf(&lst), kind+", not a regular file; only regular files are sent")
		return
	}
	// Open without following a link swapped in since the Lstat and
	// without blocking on a FIFO; then judge what was really opened.
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, syscall.ENOENT):
		return
	case errors.Is(err, syscall.ELOOP):
		s.reject(path, sigOf(&lst), "a symbolic link; only regular files are sent")
		return
	case errors.Is(err, syscall.EACCES):
		s.reject(path, sigOf(&lst), fmt.Sprintf("not readable by the agent (mode %04o); make spool files readable by group gwagent-spool (0640)", lst.Mode&0o7777))
		return
	case err != nil:
		a.log.Warn("cannot open spool file; will try again", "file", path, "err", err)
		return
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return
	}
	sig := sigOf(&st)
	if kind := fileKind(st.Mode); kind != "" {
		s.reject(path, sig, kind+", not a regular file; only regular files are sent")
		return
	}
	if isQueued && q == sig {
		return
	}
	limit := maxSpoolBody()
	if st.Size > limit {
		s.reject(path, sig, fmt.Sprintf("%d bytes; a message may have at most %d bytes (IoT Hub's 256 KiB less the message properties)", st.Size, limit))
		return
	}
	if !s.settled(path, sig) {
		return
	}
	body, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		a.log.Warn("cannot read spool file; will try again", "file", path, "err", err)
		return
	}
	var after syscall.Stat_t
	if syscall.Fstat(fd, &after) != nil || sigOf(&after) != sig || int64(len(body)) != st.Size {
		s.pending[path] = pendingFile{sig: sigOf(&after), seen: time.Now()}
		return // still being written
	}
	if !utf8.Valid(body) {
		s.reject(path, sig, "not UTF-8 text; spool files must be JSON in UTF-8")
		return
	}
	if !json.Valid(body) {
		s.reject(path, sig, "not valid JSON")
		return
	}
	err = a.enqueue(&transport.Message{Kind: transport.KindApp, Body: body, Local: path, ID: spoolID(name, sig, body),
		System: map[string]string{spoolSystemProps[0][0]: spoolSystemProps[0][1], spoolSystemProps[1][0]: spoolSystemProps[1][1]}})
	if err != nil {
		if a.repeatedNoSpace(a.cfg.Load().StateDir, err) {
			a.log.Debug("application message not queued (disk full); it stays in the spool directory", "file", path, "err", err)
		} else {
			a.log.Error("application message not queued; it stays in the spool directory", "file", path, "err", err)
		}
		return
	}
	a.spool.mu.Lock()
	a.spool.queued[path] = sig
	a.spool.mu.Unlock()
	a.log.Debug("spool file queued", "file", path)
}

// spoolID is the message id of one version of a spool file. If the agent
// dies after the PUBACK but before deleting the file, the copy sent again
// carries the same id and the cloud can drop it; a new file under the same
// name gets a new id.
func spoolID(name string, sig fileSig, body []byte) string {
	h := sha256.New()
	h.Write([]byte(name + "\x00"))
	var b [32]byte
	binary.LittleEndian.PutUint64(b[0:], sig.dev)
	binary.LittleEndian.PutUint64(b[8:], sig.ino)
	binary.LittleEndian.PutUint64(b[16:], uint64(sig.size))
	binary.LittleEndian.PutUint64(b[24:], uint64(sig.mtime))
	h.Write(b[:])
	h.Write(body)
	return "spool-" + hex.EncodeToString(h.Sum(nil)[:12])
}

// fileKind names a file type that is not a regular file; "" for a regular
// file.
func fileKind(mode uint32) string {
	switch mode & syscall.S_IFMT {
	case syscall.S_IFREG:
		return ""
	case syscall.S_IFLNK:
		return "a symbolic link"
	case syscall.S_IFIFO:
		return "a FIFO"
	case syscall.S_IFCHR, syscall.S_IFBLK:
		return "a device"
	case syscall.S_IFDIR:
		return "a directory"
	case syscall.S_IFSOCK:
		return "a socket"
	}
	return "an unknown file type"
}

// reject moves a refused spool file to rejected/ (never following links,
// never replacing a file there), warns once and counts it.
func (s *spooler) reject(path string, sig fileSig, reason string) {
	a := s.a
	delete(s.pending, path)
	dst, err := moveAside(s.dir, filepath.Base(path), time.Now())
	if err != nil {
		s.refused[path] = sig
		a.noteNoSpace(s.dir, err)
		a.log.Warn("spool file refused and left in place (cannot move it aside; tried again later)", "file", path, "reason", reason, "err", err)
	} else {
		a.log.Warn("spool file refused; moved aside", "file", path, "reason", reason, "moved_to", dst)
	}
	n := a.spoolRejected.Add(1)
	a.status.Update(true, func(st *Status) { st.SpoolRejected = n })
}

// moveAside renames dir/name into dir/rejected/. The rejected directory is
// opened without following a link, so an application that replaced it by a
// symbolic link cannot make the agent move files elsewhere (say, into the
// state directory); the rename never replaces an existing file.
func moveAside(dir, name string, now time.Time) (string, error) {
	rdir := filepath.Join(dir, spoolRejectedDir)
	if err := os.Mkdir(rdir, 0o2770); err == nil {
		os.Chmod(rdir, 0o2770) // the service's umask is 0077
	} else if !errors.Is(err, os.ErrExist) {
		return "", err
	}
	rfd, err := unix.Open(rdir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("%s is not a directory the agent may use: %w", rdir, err)
	}
	defer unix.Close(rfd)
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(dfd)
	target := name
	for i := 0; ; i++ {
		err = unix.Renameat2(dfd, name, rfd, target, unix.RENAME_NOREPLACE)
		if !errors.Is(err, unix.EEXIST) || i == 3 {
			break
		}
		target = fmt.Sprintf("%s.%d", name, now.UnixNano()+int64(i))
	}
	if err != nil {
		return "", err
	}
	return filepath.Join(rdir, target), nil
}
