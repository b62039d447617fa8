package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// fsImmutable is FS_IMMUTABLE_FL (chattr +i): not even root may unlink
// the file. It stands in for the moment between a file's PUBACK and its
// removal, which a SIGKILL cannot be aimed at: the file stays in the
// spool, delivered, for as long as the test likes.
const fsImmutable = 0x10

func setImmutable(t *testing.T, path string, on bool) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	flags, err := unix.IoctlGetInt(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err == nil {
		if on {
			flags |= fsImmutable
		} else {
			flags &^= fsImmutable
		}
		err = unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, flags)
	}
	if err != nil {
		t.Fatalf("chattr %s: %v (the test needs a file system with the immutable attribute, such as ext4, and root)", path, err)
	}
}

// A SIGKILL between a PUBACK and the removal of the spool file: the
// receipt written with the ack makes the next start remove the file
// without sending it again, but not a new version written under its name
// meanwhile (that is a new message). A power cut that also takes the
// receipt (and the acks) sends such files again, never loses one.
func TestSIGKILLBetweenAckAndRemoval(t *testing.T) {
	for _, powerCut := range []bool{false, true} {
		name := "sigkill"
		if powerCut {
			name = "power-cut"
		}
		t.Run(name, func(t *testing.T) {
			az := azsimtest.Start(t, azsim.Config{})
			reg := "gw-retire-" + name
			d := newCrashDevice(t, az, reg, "max_rate = 0\n")
			d.spoolFiles("kept", 40)
			held := []int{3, 9, 17, 25, 31}
			for _, i := range held {
				setImmutable(t, filepath.Join(d.spool, fmt.Sprintf("kept%03d.json", i)), true)
			}
			t.Cleanup(func() {
				for _, i := range held {
					if p := filepath.Join(d.spool, fmt.Sprintf("kept%03d.json", i)); fileExists(p) {
						setImmutable(t, p, false)
					}
				}
			})
			cmd := d.start()
			testenv.Eventually(t, 60*time.Second, "all 40 delivered, all but the 5 immutable files removed", func() bool {
				n, _ := bodies(az, reg, "kept")
				m, _ := filepath.Glob(filepath.Join(d.spool, "*.json"))
				return n == 40 && len(m) == len(held) && strings.Count(d.log(), "cannot delete sent spool file") == len(held)
			})
			cmd.Process.Signal(syscall.SIGKILL)
			cmd.Wait()
			for _, i := range held {
				setImmutable(t, filepath.Join(d.spool, fmt.Sprintf("kept%03d.json", i)), false)
			}
			if powerCut { // every outbox write lost: acks and receipts
				segs, _ := filepath.Glob(filepath.Join(d.state, "outbox", "*.seg"))
				for _, s := range segs {
					os.Truncate(s, 0)
				}
			}
			// While the agent is down, the application writes a new
			// reading under one delivered name: a new version, which its
			// receipt must not remove.
			renewed := fmt.Sprintf("kept%03d.json", held[0])
			os.Remove(filepath.Join(d.spool, renewed))
			testenv.SpoolPut(t, d.spool, renewed, []byte(`{"renewed":1}`))
			d.start()
			testenv.Eventually(t, 30*time.Second, "the delivered files removed", func() bool {
				m, _ := filepath.Glob(filepath.Join(d.spool, "*.json"))
				return len(m) == 0
			})
			time.Sleep(time.Second)
			n, total := bodies(az, reg, "kept")
			_, renewals := bodies(az, reg, "renewed")
			switch {
			case n != 40:
				t.Fatalf("%d of 40 messages at the hub", n)
			case renewals != 1:
				t.Fatalf("the new version written under a delivered name arrived %d times, want once", renewals)
			case !powerCut && total != 40:
				cnt := map[float64]int{}
				for _, m := range az.Telemetry() {
					if b, ok := m["body"].(map[string]any); ok && m["deviceId"] == reg {
						if v, ok := b["kept"].(float64); ok {
							cnt[v]++
						}
					}
				}
				for k, v := range cnt {
					if v > 1 {
						t.Logf("kept%03d.json arrived %d times", int(k), v)
					}
				}
				t.Fatalf("%d copies for 40 messages: files delivered before the SIGKILL were sent again\n%s", total, d.log())
			case powerCut && total != 40+len(held)-1:
				t.Fatalf("%d copies for 40 messages after a power cut that took the receipts: want the %d old files still in the spool sent again", total, len(held)-1)
			}
		})
	}
}

func fileExists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// A file leaves the spool only once its message reached the hub, across a
// connection dropped mid-drain, a SIGKILL and the start after it, which
// removes the files the outbox's receipts name: at each point, every file
// missing from the spool has its message at the hub. The hub refuses the restarted agent
// until the receipts were acted on, so that nothing sent after the crash
// can hide a file removed undelivered.
func TestSIGKILLNeverRemovesUndelivered(t *testing.T) {
	const n = 3000
	az := azsimtest.Start(t, azsim.Config{})
	const reg = "gw-retire-undelivered"
	d := newCrashDevice(t, az, reg, "max_rate = 0\n")
	for i := range n {
		testenv.SpoolPut(t, d.spool, fmt.Sprintf("u%04d.json", i), []byte(fmt.Sprintf(`{"u":%d}`, i)))
	}
	arrived := func() map[int]bool {
		seen := map[int]bool{}
		for _, m := range az.Telemetry() {
			if b, ok := m["body"].(map[string]any); ok && m["deviceId"] == reg {
				if v, ok := b["u"].(float64); ok {
					seen[int(v)] = true
				}
			}
		}
		return seen
	}
	// removedUndelivered lists the files gone from the spool whose message
	// the hub never had.
	removedUndelivered := func() (bad []int, inSpool int) {
		seen := arrived()
		for i := range n {
			if fileExists(filepath.Join(d.spool, fmt.Sprintf("u%04d.json", i))) {
				inSpool++
			} else if !seen[i] {
				bad = append(bad, i)
			}
		}
		return bad, inSpool
	}
	cmd := d.start()
	testenv.Eventually(t, 60*time.Second, "the drain under way", func() bool { return len(arrived()) >= 600 })
	// The hub drops the connection mid-drain (what was published and not
	// received is lost on the way) and refuses the next ones; then the
	// agent is killed.
	az.Admin("POST", "/faults/refuse", map[string]any{"target": "hub", "seconds": 300}, nil)
	time.Sleep(time.Second)
	bad, inSpool := removedUndelivered()
	if len(bad) > 0 {
		t.Fatalf("after a connection drop mid-drain, %d files gone from the spool were never delivered (first: u%04d)", len(bad), bad[0])
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if bad, inSpool = removedUndelivered(); len(bad) > 0 {
		t.Fatalf("after the SIGKILL, %d files gone from the spool were never delivered (first: u%04d)", len(bad), bad[0])
	}
	delivered := len(arrived())
	t.Logf("at the SIGKILL: %d delivered, %d files in the spool", delivered, inSpool)
	cmd = d.start()
	// The receipts name every acknowledged file but those of the last
	// PUBACKs, whose receipts may not have been written: at most a window.
	testenv.Eventually(t, 30*time.Second, "the files of the receipts removed at start", func() bool {
		_, inSpool = removedUndelivered()
		return inSpool <= n-delivered+256
	})
	time.Sleep(time.Second)
	if len(arrived()) != delivered {
		t.Fatal("messages arrived while the hub refused connections")
	}
	if bad, inSpool = removedUndelivered(); len(bad) > 0 {
		t.Fatalf("the start after the SIGKILL removed %d files that were never delivered (first: u%04d)", len(bad), bad[0])
	}
	t.Logf("after the start: %d files in the spool (%d undelivered)", inSpool, n-delivered)
	az.Admin("POST", "/faults/refuse", map[string]any{"target": "hub", "seconds": 0}, nil)
	testenv.Eventually(t, 90*time.Second, "every message delivered, the spool empty", func() bool {
		_, inSpool = removedUndelivered()
		return len(arrived()) == n && inSpool == 0
	})
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()
}
