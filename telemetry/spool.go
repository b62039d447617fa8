package telemetry

import (
	"context"
	"crypto/rand"
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

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/dirwatch"
	"github.com/gwagent/gwagent/telemetry/outbox"
	"golang.org/x/sys/unix"
)

// The spool directory is local applications' inbox. Its rules (README,
// "Sending your own messages") are enforced here:
//
//   - Only *.json names not starting with '.' are considered, so a writer
//     can use a temporary name and rename it into place.
//   - Only regular files are read: symbolic links, FIFOs, devices and
//     directories are refused without being opened or followed.
//   - A file renamed into the directory (inotify's IN_MOVED_TO) is
//     complete and read at once. Any other file is taken once it has
//     settled: unchanged for [telemetry] spool_settle (default 1s), judged
//     by its modification time or, when that is in the future, by watching
//     it. This protects applications that write in place in several
//     chunks. A file the agent may not read is refused only once it has
//     settled too, its mode included: a writer may create it 0600 and
//     chmod it when done.
//   - Its size is checked before it is read, against the hub's limit for a
//     whole message (body plus properties).
//   - The content must be valid UTF-8 JSON, nested no deeper than the
//     parser takes (maxJSONDepth).
//
// A refused file is moved to rejected/ inside the spool directory, with one
// warning naming it and the reason, and counted in status and health;
// rejected/ keeps the newest RejectedKeep files (rejected.go).
// A file is deleted after the hub acknowledged it; a later file with the
// same name is a new message. The directory is sticky (spoolMode), so one
// application cannot delete or replace another's file; the agent owns it
// and may move any.

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
	return MaxMessageBytes - int64(n)
}

// queuedFiles is shared by the spool loop (which queues files) and the
// drain's retirement (which takes them out after the hub's PUBACK).
type queuedFiles struct {
	mu   sync.Mutex
	sigs map[string]dirwatch.Sig // path → the version in the outbox
}

// spoolRescan is how often the spool directory is looked at again besides
// the watcher's events: it picks up files refused while the outbox was
// full, files a refusal could not move aside, and a new spool_dir (see
// rescan for the files already queued).
const spoolRescan = 30 * time.Second

// pendingFile is a spool file that has not settled yet.
type pendingFile struct {
	sig  dirwatch.Sig
	seen time.Time // when this signature was first seen
}

// spooler is the spool loop's own state.
type spooler struct {
	p       *Pipeline
	dir     string
	pending map[string]pendingFile
	soonest time.Time               // when the earliest pending file may have settled
	refused map[string]dirwatch.Sig // could not be moved aside: warned once
	scanErr string                  // the last error reading the directory, warned once
}

// spoolLoop watches the spool directory for *.json files from local
// applications and queues each as one message; the file leaves the spool
// after the hub's PUBACK (drain.go, retire.go).
func (p *Pipeline) spoolLoop(ctx context.Context) {
	s := &spooler{p: p, dir: p.o.Spool().Dir, pending: map[string]pendingFile{}, refused: map[string]dirwatch.Sig{}}
	w := p.watchSpool(s.dir)
	defer w.Close()
	s.scan()
	retry, retryC := p.clock.NewTicker(spoolRescan)
	defer retry.Stop()
	// One timer for all pending files, armed for the soonest.
	settle, settleC := p.clock.NewTimer(time.Hour)
	settle.Stop()
	defer settle.Stop()
	var armed time.Time
	resetSettle := func() {
		if len(s.pending) == 0 || s.soonest.IsZero() || s.soonest.Equal(armed) {
			return
		}
		armed = s.soonest
		settle.Reset(max(clock.Until(p.clock, armed), 10*time.Millisecond))
	}
	resetSettle()
	// While a file system is full, look every diskCheckEvery whether space
	// was freed, and then queue what waited at once.
	var diskTick clock.Ticker
	var diskC <-chan time.Time
	defer func() {
		if diskTick != nil {
			diskTick.Stop()
		}
	}()
	watchDisk := func() {
		if diskTick == nil && p.diskFull() {
			diskTick, diskC = p.clock.NewTicker(diskCheckEvery)
		}
	}
	watchDisk()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events():
			switch {
			case !ok || ev.ended:
				// The directory was removed or moved away: made anew
				// already if it can be watched again at once (its new
				// inode may well have the old one's number).
				if w.Rewatch(); w.f != nil {
					p.log.Warn("the spool directory was made anew; watching the new one", "dir", s.dir)
				}
				s.scan()
			case ev.overflow:
				// Events were lost: look at the whole directory now, not
				// at the next rescan.
				p.log.Warn("spool watcher: the kernel's event queue overflowed; looking at the whole spool directory", "dir", s.dir)
				s.scan()
			case ev.mask&unix.IN_MOVED_TO != 0:
				// Renamed into place: complete, as the README promises
				// applications, so it is taken at once.
				s.look(filepath.Join(s.dir, ev.name), true)
			default: // IN_CREATE, IN_CLOSE_WRITE, IN_ATTRIB
				s.look(filepath.Join(s.dir, ev.name), false)
			}
			resetSettle()
		case <-w.Tick():
			if w.Ticked(); w.Events() != nil {
				s.scan() // inotify is back: one full look after polling
			} else {
				s.rescan()
			}
			resetSettle()
		case <-settleC:
			armed, s.soonest = time.Time{}, time.Time{}
			for f := range s.pending {
				s.file(f)
			}
			resetSettle()
		case <-diskC:
			if p.roomAgain() {
				diskTick.Stop()
				diskTick, diskC = nil, nil
				p.makeSpool(s.dir)
				p.outbox.Save()
				s.moveRefused()
				s.scan()
				resetSettle()
			}
		case <-retryC:
			if w.Stale() {
				p.log.Warn("the spool directory was made anew; watching the new one", "dir", s.dir)
				w.Rewatch()
			}
			if nd := p.o.Spool().Dir; nd != s.dir {
				if err := w.Move(nd); err != nil {
					p.log.Error("cannot watch new spool directory", "dir", nd, "err", err)
				} else {
					p.log.Info("spool directory changed", "from", s.dir, "to", nd)
					s.dir = nd
					clear(s.pending)
					p.checkSpoolMode(nd)
				}
			}
			if p.outbox.Unsaved() != nil && !p.diskFull() {
				p.outbox.Save() // room came without disk-full noticing
			}
			s.moveRefused()
			if w.Events() == nil {
				s.scan() // polling: no event reports a queued file replaced
			} else {
				s.rescan()
			}
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
		if syscall.Lstat(p, &st) != nil || dirwatch.SigOf(&st) != sig {
			continue // gone or changed: looked at afresh by the scan
		}
		if dst, err := moveAside(s.dir, filepath.Base(p), s.p.clock.Now()); err == nil {
			delete(s.refused, p)
			s.p.log.Info("refused spool file moved aside now", "file", p, "moved_to", dst)
		}
	}
}

// loadQueued notes the spool files already in the outbox (queued before a
// restart), so they are not queued twice, and the files delivered but not
// yet removed (receipts found at Open, waiting for the retirer), so they
// are not queued again.
func (p *Pipeline) loadQueued() {
	p.queued.mu.Lock()
	defer p.queued.mu.Unlock()
	p.queued.sigs = map[string]dirwatch.Sig{}
	p.retire.mu.Lock()
	for _, r := range p.retire.queue {
		p.queued.sigs[r.Path] = sigOf(r.ID)
	}
	p.retire.mu.Unlock()
	var last uint64
	for {
		ms, err := p.outbox.Next(last, 256)
		if err != nil || len(ms) == 0 {
			return
		}
		for _, m := range ms {
			last = m.Seq
			if m.Local == "" {
				continue
			}
			if m.LocalID != (outbox.FileID{}) {
				p.queued.sigs[m.Local] = sigOf(m.LocalID)
				continue
			}
			// Queued by an older version, which did not record the
			// version read: the file in place stands for it.
			var st syscall.Stat_t
			if syscall.Lstat(m.Local, &st) == nil {
				p.queued.sigs[m.Local] = dirwatch.SigOf(&st)
			}
		}
	}
}

// scan looks at every entry of the spool directory: at start (a file may
// have been replaced while the agent was not running), after lost events,
// a new watch or a full disk, and at every rescan while polling.
func (s *spooler) scan() { s.scanDir(true) }

// rescan is the look at the directory that does not follow a known loss
// of events: the rescan while inotify watches, and the poll tick. It
// skips the files already queued, whose lstat was most of its cost (80 ms
// of CPU for 20,000 queued files on the bench machine, every 30 s for as
// long as the hub is out of reach). A queued file replaced under the same
// name is seen anyway: the kernel reports a rename or a write into the
// directory, and without inotify the 30 s rescan is a full scan. Only a
// replacement no event reports (made by another host on a network file
// system) waits until its old version is delivered: the retirer then
// leaves the file, which is not the version sent, and forgets the name as
// queued, and the next look queues it.
func (s *spooler) rescan() { s.scanDir(false) }

func (s *spooler) scanDir(all bool) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		// Once per problem: a missing directory is polled every 2 s.
		if err.Error() != s.scanErr {
			s.p.log.Warn("cannot read the spool directory", "err", err)
			s.scanErr = err.Error()
		}
		return
	}
	s.scanErr = ""
	present := make(map[string]bool, len(ents))
	look := make([]string, 0, len(ents))
	s.p.queued.mu.Lock()
	for _, e := range ents {
		p := filepath.Join(s.dir, e.Name())
		present[p] = true
		if _, queued := s.p.queued.sigs[p]; all || !queued {
			look = append(look, p)
		}
	}
	s.p.queued.mu.Unlock()
	for _, p := range look {
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
	s.p.queued.mu.Lock()
	for p := range s.p.queued.sigs {
		if filepath.Dir(p) == s.dir && !present[p] {
			delete(s.p.queued.sigs, p)
		}
	}
	s.p.queued.mu.Unlock()
}

// settled decides whether the file with signature sig may be read now. If
// not, it is pending, and s.soonest says when to look at pending files again.
func (s *spooler) settled(path string, sig dirwatch.Sig) bool {
	settle := s.p.o.Spool().Settle
	// Compared with file times the kernel sets: the clock must be the
	// system's (tests that fake it set the files' times to match).
	now := s.p.clock.Now()
	mt := time.Unix(0, sig.Mtime)
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
func (s *spooler) file(path string) { s.look(path, false) }

// look looks at one spool entry and queues, defers or refuses it. renamed
// says the kernel just reported it renamed into the directory: a readable
// file is then complete and read at once, without the settle wait.
func (s *spooler) look(path string, renamed bool) {
	p := s.p
	name := filepath.Base(path)
	if filepath.Dir(path) != s.dir || strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".json") {
		return
	}
	var lst syscall.Stat_t
	if err := syscall.Lstat(path, &lst); err != nil {
		delete(s.pending, path)
		return // gone already
	}
	p.queued.mu.Lock()
	q, isQueued := p.queued.sigs[path]
	p.queued.mu.Unlock()
	if isQueued && q == dirwatch.SigOf(&lst) {
		return
	}
	if sig, ok := s.refused[path]; ok && sig == dirwatch.SigOf(&lst) {
		return
	}
	if kind := fileKind(lst.Mode); kind != "" {
		s.reject(path, dirwatch.SigOf(&lst), kind+", not a regular file; only regular files are sent")
		return
	}
	// Open without following a link swapped in since the Lstat and
	// without blocking on a FIFO; then judge what was really opened.
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, syscall.ENOENT):
		return
	case errors.Is(err, syscall.ELOOP):
		s.reject(path, dirwatch.SigOf(&lst), "a symbolic link; only regular files are sent")
		return
	case errors.Is(err, syscall.EACCES):
		// A writer may create the file 0600 and chmod it once written:
		// it is refused only once it has been unchanged, mode included
		// (its ctime), for the settle time.
		if !s.settled(path, unreadableSig(&lst)) {
			return
		}
		s.reject(path, dirwatch.SigOf(&lst), fmt.Sprintf("not readable by the agent (mode %04o); make spool files readable by group gwagent-spool (0640)", lst.Mode&0o7777))
		return
	case err != nil:
		p.log.Warn("cannot open spool file; will try again", "file", path, "err", err)
		return
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return
	}
	sig := dirwatch.SigOf(&st)
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
	if renamed {
		delete(s.pending, path)
	} else if !s.settled(path, sig) {
		return
	}
	body, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		p.log.Warn("cannot read spool file; will try again", "file", path, "err", err)
		return
	}
	var after syscall.Stat_t
	if syscall.Fstat(fd, &after) != nil || dirwatch.SigOf(&after) != sig || int64(len(body)) != st.Size {
		s.pending[path] = pendingFile{sig: dirwatch.SigOf(&after), seen: p.clock.Now()}
		return // still being written
	}
	if !utf8.Valid(body) {
		s.reject(path, sig, "not UTF-8 text; spool files must be JSON in UTF-8")
		return
	}
	if !json.Valid(body) {
		reason := "not valid JSON"
		if jsonDeeperThan(body, maxJSONDepth) {
			reason = fmt.Sprintf("JSON nested deeper than %d levels, the most the agent's JSON parser takes; flatten the document", maxJSONDepth)
		}
		s.reject(path, sig, reason)
		return
	}
	err = p.enqueue(&outbox.Message{Kind: outbox.KindApp, Body: body, Local: path, LocalID: fileID(sig), ID: spoolID(name, sig, body),
		System: map[string]string{spoolSystemProps[0][0]: spoolSystemProps[0][1], spoolSystemProps[1][0]: spoolSystemProps[1][1]}})
	if err != nil {
		if p.repeatedNoSpace(p.o.StateDir, err) {
			p.log.Debug("application message not queued (disk full); it stays in the spool directory", "file", path, "err", err)
		} else {
			p.log.Error("application message not queued; it stays in the spool directory", "file", path, "err", err)
		}
		return
	}
	p.queued.mu.Lock()
	p.queued.sigs[path] = sig
	p.queued.mu.Unlock()
	p.log.Debug("spool file queued", "file", path)
}

// unreadableSig is the signature an unreadable file settles by: its
// modification time or, if later, its status change time, so that a chmod
// (or a rename into place) starts the wait again.
func unreadableSig(st *syscall.Stat_t) dirwatch.Sig {
	sig := dirwatch.SigOf(st)
	sig.Mtime = max(sig.Mtime, st.Ctim.Nano())
	return sig
}

// maxJSONDepth is how deeply encoding/json lets arrays and objects nest
// (its scanner's maxNestingDepth); TestJSONDepthLimit holds it to that.
const maxJSONDepth = 10000

// jsonDeeperThan reports whether arrays and objects in b nest deeper than
// limit, looking no further than that (b need not be valid).
func jsonDeeperThan(b []byte, limit int) bool {
	depth := 0
	inString, escaped := false, false
	for _, c := range b {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '[' || c == '{':
			if depth++; depth > limit {
				return true
			}
		case c == ']' || c == '}':
			depth--
		}
	}
	return false
}

// spoolID is the message id of one version of a spool file. If the agent
// dies after the PUBACK but before deleting the file, the copy sent again
// carries the same id and the cloud can drop it; a new file under the same
// name gets a new id.
func spoolID(name string, sig dirwatch.Sig, body []byte) string {
	h := sha256.New()
	h.Write([]byte(name + "\x00"))
	var b [32]byte
	binary.LittleEndian.PutUint64(b[0:], sig.Dev)
	binary.LittleEndian.PutUint64(b[8:], sig.Ino)
	binary.LittleEndian.PutUint64(b[16:], uint64(sig.Size))
	binary.LittleEndian.PutUint64(b[24:], uint64(sig.Mtime))
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
// never replacing a file there), warns once and counts it. rejected/ is
// kept to its bounds by the sweeper (rejected.go).
func (s *spooler) reject(path string, sig dirwatch.Sig, reason string) {
	p := s.p
	delete(s.pending, path)
	dst, err := moveAside(s.dir, filepath.Base(path), p.clock.Now())
	if err != nil {
		s.refused[path] = sig
		p.noteNoSpace(s.dir, err)
		p.log.Warn("spool file refused and left in place (cannot move it aside; tried again later)", "file", path, "reason", reason, "err", err)
	} else {
		p.log.Warn("spool file refused; moved aside", "file", path, "reason", reason, "moved_to", dst)
		p.pruneSoon()
	}
	p.rejected.Add(1)
	p.o.Changed(true)
}

// rejectedMode is rejected/'s mode: the agent's own directory, which
// members of the spool group may read (to see why their file was refused)
// but not write, so they can neither plant files there nor delete others'.
const rejectedMode = 0o750

// moveAside renames dir/name into dir/rejected/. The rejected directory is
// opened without following a link and must be the agent's own, so an
// application that replaced it by a symbolic link or made it first cannot
// make the agent move files elsewhere (say, into the state directory) or
// into its hands; the rename never replaces an existing file.
func moveAside(dir, name string, now time.Time) (string, error) {
	rfd, err := openRejected(dir)
	if err != nil {
		return "", err
	}
	defer unix.Close(rfd)
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(dfd)
	// The name, or with the time, or (a clock that stands still, or a
	// name an earlier refusal took at the same instant) with a random
	// suffix.
	target := name
	for i := 0; ; i++ {
		err = unix.Renameat2(dfd, name, rfd, target, unix.RENAME_NOREPLACE)
		if !errors.Is(err, unix.EEXIST) || i == 8 {
			break
		}
		if i == 0 {
			target = fmt.Sprintf("%s.%d", name, now.UnixNano())
		} else {
			target = fmt.Sprintf("%s.%d.%s", name, now.UnixNano(), rand.Text()[:8])
		}
	}
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, spoolRejectedDir, target), nil
}

// openRejected opens dir/rejected, making it if needed, and checks that it
// is the agent's own directory with rejectedMode (a rejected/ of an older
// version, group-writable, is brought to it).
func openRejected(dir string) (int, error) {
	rdir := filepath.Join(dir, spoolRejectedDir)
	rfd, st, err := openOwnDir(rdir, rejectedMode)
	if err != nil {
		return -1, err
	}
	if st.Mode&0o7777 != rejectedMode {
		// No set-id bit in the new mode: the unit's RestrictSUIDSGID
		// allows this chmod.
		if err := unix.Fchmod(rfd, rejectedMode); err != nil {
			unix.Close(rfd)
			return -1, fmt.Errorf("%s: mode %04o, and it cannot be made %04o: %w", rdir, st.Mode&0o7777, rejectedMode, err)
		}
	}
	return rfd, nil
}
