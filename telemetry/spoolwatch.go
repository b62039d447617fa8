package telemetry

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/dirwatch"
)

// The spool is watched with raw inotify rather than fsnotify (which the
// config watch keeps), because fsnotify reports a file renamed into the
// directory as a plain Create: it cannot tell the documented way of
// writing a spool file (a temporary name, then a rename, after which the
// file is complete) from a file created in place that may still be
// written. IN_MOVED_TO says which it was, so renamed-in files are taken at
// once and only files created in place wait the settle rule.

// spoolMask is what the spool watch asks the kernel for. IN_MODIFY is left
// out on purpose: a file written in place is judged at the settle timer by
// its signature, and IN_CLOSE_WRITE says when a writer is done; an event
// per write() would only cost a look at the file each. So are IN_DELETE
// and IN_MOVED_FROM: the agent's own removal of every delivered file would
// wake the spool loop once per message, and a file that leaves before it
// settled is found gone when its settle timer looks at it.
const spoolMask = unix.IN_CREATE | unix.IN_CLOSE_WRITE | unix.IN_ATTRIB | unix.IN_MOVED_TO |
	unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// spoolEvent is one event about the spool directory.
type spoolEvent struct {
	name string // base name of the entry; "" for the events below
	mask uint32
	// overflow: events were lost (the kernel's queue was full): look at
	// the whole directory.
	overflow bool
	// ended: the watch itself ended (the directory was removed or moved
	// away, or reading failed): watch it again, then look at it.
	ended bool
}

// inotifyInit makes a non-blocking inotify instance; Options.Inotify
// stands in for it in tests.
func inotifyInit() (int, error) {
	return unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
}

// spoolWatch watches the spool directory with inotify or, when that cannot
// be had (the per-user instance limit is used up, or the file system has
// no inotify), by scanning it every dirwatch.PollEvery, with CondSpoolPolled
// raised and inotify tried again at every tick, like dirwatch. It belongs
// to the spool loop; its reader goroutine ends in stop.
type spoolWatch struct {
	p     *Pipeline
	init  func() (int, error)
	dir   string
	ino   [2]uint64 // device and inode of the directory watched
	fd    int       // the inotify instance (kept: os.File.Fd would make f blocking)
	f     *os.File  // the same, for reading; nil while polling
	wd    atomic.Int32
	ev    chan spoolEvent
	wg    sync.WaitGroup
	poll  clock.Ticker
	pollC <-chan time.Time
}

func (p *Pipeline) watchSpool(dir string) *spoolWatch {
	w := &spoolWatch{p: p, init: p.o.Inotify, dir: dir}
	if w.init == nil {
		w.init = inotifyInit
	}
	if err := w.watch(); err != nil {
		w.pollInstead(err)
	}
	return w
}

// pollInstead falls back on scanning, saying why.
func (w *spoolWatch) pollInstead(err error) {
	w.p.log.Warn("cannot watch the spool directory with inotify; scanning it every "+dirwatch.PollEvery.String()+" instead",
		"dir", w.dir, "err", err, "hint", "raise fs.inotify.max_user_instances if other services use them all")
	w.p.sink.Raise(CondSpoolPolled, "spool directory "+w.dir+": "+err.Error())
	w.poll, w.pollC = w.p.clock.NewTicker(dirwatch.PollEvery)
}

// watch replaces polling by an inotify watch, if it can.
func (w *spoolWatch) watch() error {
	fd, err := w.init()
	if err != nil {
		return fmt.Errorf("inotify: %w", err)
	}
	wd, err := unix.InotifyAddWatch(fd, w.dir, spoolMask)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("inotify watch %s: %w", w.dir, err)
	}
	w.ino = dirID(w.dir)
	// A non-blocking descriptor goes to the runtime's poller, so Close
	// wakes a pending Read.
	w.fd, w.f = fd, os.NewFile(uintptr(fd), "inotify")
	w.wd.Store(int32(wd))
	w.ev = make(chan spoolEvent, 64)
	f, ev := w.f, w.ev
	w.wg.Go(func() { w.read(f, ev) })
	return nil
}

// read turns what the kernel writes into spoolEvents until f is closed.
func (w *spoolWatch) read(f *os.File, out chan<- spoolEvent) {
	defer close(out)
	buf := make([]byte, 16*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
	for {
		n, err := f.Read(buf)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				out <- spoolEvent{ended: true}
			}
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			raw := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			end := off + unix.SizeofInotifyEvent + int(raw.Len)
			if end > n {
				break
			}
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:end]), "\x00") // NUL padding
			off = end
			switch {
			case raw.Mask&unix.IN_Q_OVERFLOW != 0:
				out <- spoolEvent{mask: raw.Mask, overflow: true}
			case raw.Wd != w.wd.Load():
				// An old directory's, after Move.
			case raw.Mask&(unix.IN_IGNORED|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0:
				out <- spoolEvent{mask: raw.Mask, ended: true}
			case name != "":
				out <- spoolEvent{name: name, mask: raw.Mask}
			}
		}
	}
}

// Events delivers while watching with inotify (nil while polling). A
// closed channel means the watch ended as with spoolEvent.ended.
func (w *spoolWatch) Events() <-chan spoolEvent {
	if w.f == nil {
		return nil
	}
	return w.ev
}

// Tick delivers while polling: scan the directory, then call Ticked.
func (w *spoolWatch) Tick() <-chan time.Time { return w.pollC }

// Ticked is called on every poll tick: it tries to get inotify back.
func (w *spoolWatch) Ticked() {
	if w.watch() != nil {
		return
	}
	w.poll.Stop()
	w.poll, w.pollC = nil, nil
	w.p.log.Info("watching the spool directory with inotify again", "dir", w.dir)
	w.p.sink.Clear(CondSpoolPolled)
}

// Rewatch watches the directory afresh after the watch ended (the
// directory was removed, perhaps to be made again); until that works it
// is polled.
func (w *spoolWatch) Rewatch() {
	w.stop()
	if w.poll != nil {
		return // polling already; Ticked tries inotify again
	}
	if err := w.watch(); err != nil {
		w.pollInstead(err)
	}
}

// Stale reports whether the directory at the watched path is no longer
// the one watched: it was removed (or moved away) and made again. The
// kernel says so (IN_DELETE_SELF) only once nothing holds the old one open,
// and the agent itself holds it (the retirer), so the rescan asks.
func (w *spoolWatch) Stale() bool {
	if w.f == nil {
		return false
	}
	id := dirID(w.dir)
	return id != [2]uint64{} && id != w.ino
}

// dirID is the device and inode of dir, zero if it cannot be read.
func dirID(dir string) [2]uint64 {
	var st unix.Stat_t
	if unix.Stat(dir, &st) != nil {
		return [2]uint64{}
	}
	return [2]uint64{st.Dev, st.Ino}
}

// Move watches dir instead of the current directory.
func (w *spoolWatch) Move(dir string) error {
	if w.f != nil {
		wd, err := unix.InotifyAddWatch(w.fd, dir, spoolMask)
		if err != nil {
			return err
		}
		if old := w.wd.Swap(int32(wd)); old != int32(wd) {
			unix.InotifyRmWatch(w.fd, uint32(old))
		}
	}
	w.dir = dir
	w.ino = dirID(dir)
	return nil
}

// stop ends the inotify instance and its reader.
func (w *spoolWatch) stop() {
	if w.f == nil {
		return
	}
	w.f.Close()
	for range w.ev { // a reader blocked on a send finishes
	}
	w.wg.Wait()
	w.f, w.ev = nil, nil
}

// Close stops watching.
func (w *spoolWatch) Close() {
	w.stop()
	if w.poll != nil {
		w.poll.Stop()
		w.poll, w.pollC = nil, nil
	}
}
