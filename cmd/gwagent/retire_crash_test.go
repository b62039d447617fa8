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
// without sending it again. A power cut that also takes the receipt (and
// the acks) sends such files again, never loses one.
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
			d.start()
			testenv.Eventually(t, 30*time.Second, "the delivered files removed", func() bool {
				m, _ := filepath.Glob(filepath.Join(d.spool, "*.json"))
				return len(m) == 0
			})
			time.Sleep(time.Second)
			n, total := bodies(az, reg, "kept")
			switch {
			case n != 40:
				t.Fatalf("%d of 40 messages at the hub", n)
			case !powerCut && total != 40:
				t.Fatalf("%d copies for 40 messages: files delivered before the SIGKILL were sent again", total)
			case powerCut && total != 40+len(held):
				t.Fatalf("%d copies for 40 messages after a power cut that took the receipts: want the %d files still in the spool sent again", total, len(held))
			}
		})
	}
}

func fileExists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}
