package agent_test

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/provisioning"
)

// The state directory (identity store, file keys, renewal-pending.json,
// status) is on a real tmpfs that fills up just before the certificate is
// due for renewal. The user cares that:
//   - the agent keeps its old, still valid identity and keeps sending
//     telemetry;
//   - nothing half-written is left (no new key, no staged or partial
//     generation, no temp files), and a restart on the still full disk
//     connects with the old certificate;
//   - status and log say the disk is full and what to do;
//   - once space is freed, the renewal completes without a restart and the
//     new certificate is used.
//
// The disk is first full to the last block, then has room for a new key
// but not for a whole renewal. While it is full, the agent does not ask the
// hub for a certificate it could not store (that would spend the issuance
// quota on every retry). The file
// system runs out of blocks, or out of inodes (no new file at all: not the
// key, not a generation directory).
func TestRenewalDiskFull(t *testing.T) {
	t.Parallel()
	t.Run("out of blocks", func(t *testing.T) { t.Parallel(); renewalDiskFull(t, "gw-renew-full-blocks", false, keyFile) })
	t.Run("out of inodes", func(t *testing.T) { t.Parallel(); renewalDiskFull(t, "gw-renew-full-inodes", true, keyFile) })
}

// The same with the operational key in a TPM, its blob in the state
// directory on the full file system, and in a PKCS#11 token (SoftHSM2)
// whose token directory is on that file system too: key blobs and token
// objects that cannot be written must leave nothing behind either, and
// the key in use must keep signing the hub's handshakes.
func TestRenewalDiskFullKeyStores(t *testing.T) {
	for _, inodes := range []bool{false, true} {
		out := map[bool]string{false: "blocks", true: "inodes"}[inodes]
		t.Run("tpm/out of "+out, func(t *testing.T) { renewalDiskFull(t, "gw-renew-full-tpm-"+out, inodes, keyTPM) })
		t.Run("pkcs11/out of "+out, func(t *testing.T) { renewalDiskFull(t, "gw-renew-full-p11-"+out, inodes, keyPKCS11) })
	}
}

// The key store's own storage is full while the state directory has room
// (a TPM key blob directory or a SoftHSM2 token directory on a file system
// of its own): the renewal, which finds room in the state directory, fails
// creating the key. The old identity stays in use, nothing half-made is
// left in the key store (no blob, no temp file, no token object no
// identity uses), the error says what is full, and once space is freed the
// renewal completes without a restart.
func TestRenewalKeyStoreFull(t *testing.T) {
	for _, backend := range []keyBackend{keyTPM, keyPKCS11} {
		name := map[keyBackend]string{keyTPM: "tpm", keyPKCS11: "pkcs11"}[backend]
		t.Run(name, func(t *testing.T) { renewalKeyStoreFull(t, "gw-keystore-full-"+name, backend) })
	}
}

func renewalKeyStoreFull(t *testing.T, devID string, backend keyBackend) {
	ft, az := fakeAzsim(t, azsim.Config{CertLifetime: 60 * time.Second})
	keys := filepath.Join(t.TempDir(), "keys")
	testenv.Tmpfs(t, keys, "size=1m,nr_inodes=64,mode=0700")
	var opKey string
	switch backend {
	case keyTPM:
		opKey = "tpm2:socket=" + testenv.StartSWTPM(t).Sock + ";blob=" + filepath.Join(keys, "op.tpmkey")
	case keyPKCS11:
		opKey = testenv.StartSoftHSMAt(t, filepath.Join(keys, "tokens"), "gw", "1234").URI("op")
	}
	d := newDevice(t, az, devOpts{regID: devID, extra: fastRenewal, opKey: opKey})
	d.clock = ft
	old, err := d.provision()
	if err != nil {
		t.Fatal(err)
	}
	before := listTree(t, keys)
	r := d.start()
	testenv.Eventually(t, 20*time.Second, "connected", func() bool { return d.status().State == "connected" })
	free := testenv.Fill(t, keys, true)
	allowRenewal(ft, old, 0.5)
	testenv.Eventually(t, 10*time.Second, "a renewal failing for want of room in the key store", func() bool {
		return strings.Count(r.log.String(), "certificate renewal failed") >= 2
	})
	st := d.status()
	reason := st.Conditions[agent.CondRenewalFailed]
	t.Logf("renewal-failed: %s", reason)
	if st.State != "connected" || st.CertSerial != old.Serial {
		t.Fatalf("state %q with serial %s, want connected with the old certificate %s", st.State, st.CertSerial, old.Serial)
	}
	assertOldIdentityIntact(t, d, old)
	if after := listTree(t, keys); after != before {
		t.Fatalf("the key store holds something a failed renewal left:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	switch {
	case backend == keyTPM && !strings.Contains(reason, "free space"):
		t.Errorf("the reason does not say which file system to free: %s", reason)
	case backend == keyPKCS11 && !strings.Contains(reason, "full file system"):
		t.Errorf("the reason does not say the token's storage may be full: %s", reason)
	}
	free()
	ft.Allow(10 * time.Second) // the retry (at most 2 s) and a disk check
	testenv.Eventually(t, 10*time.Second, "renewed and connected once space was freed", func() bool {
		cur, err := storeCurrent(d)
		st := d.status()
		return err == nil && cur.Serial != old.Serial && st.State == "connected" && st.CertSerial == cur.Serial
	})
	if keyExists(t, old.KeyURI) {
		t.Fatal("the old key is still there after the swap")
	}
}

// listTree lists the files below dir (but the filler of testenv.Fill),
// with their sizes.
func listTree(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == ".fill" {
			return filepath.SkipDir
		}
		if info, err := e.Info(); err == nil && !e.IsDir() {
			fmt.Fprintf(&b, "%s %d\n", rel, info.Size())
		}
		return nil
	})
	return b.String()
}

// keyBackend is where the operational key of a disk-full test lives.
type keyBackend int

const (
	keyFile   keyBackend = iota // a file in the state directory
	keyTPM                      // swtpm, the key's blob in the state directory
	keyPKCS11                   // SoftHSM2, its token directory in the state directory
)

// renewalDiskFull runs on a fake clock of its own, shared with its azsim:
// the 60-second certificate is due at 30 s, and each step lets the clock
// run a few seconds for the retries (retry_min 500ms) and the disk checks
// (every 5 s), so the certificate stays valid throughout.
func renewalDiskFull(t *testing.T, devID string, inodes bool, backend keyBackend) {
	ft, az := fakeAzsim(t, azsim.Config{CertLifetime: 60 * time.Second})
	var o devOpts
	var sw *testenv.SWTPM
	switch backend {
	case keyTPM:
		sw = testenv.StartSWTPM(t)
		o.opKey = "tpm2:socket=" + sw.Sock + ";blob=STATE/op.tpmkey"
	case keyPKCS11:
		o.opKey = "file:" + filepath.Join(t.TempDir(), "replaced-by-the-token.key")
	}
	o.regID, o.extra = devID, fastRenewal
	d := newDevice(t, az, o)
	d.clock = ft
	testenv.Tmpfs(t, d.cfg.StateDir, "size=2m,nr_inodes=256,mode=0700")
	if backend != keyFile {
		b, _ := os.ReadFile(d.path)
		toml := strings.Replace(string(b), "STATE", d.cfg.StateDir, 1)
		if backend == keyPKCS11 {
			h := testenv.StartSoftHSMAt(t, filepath.Join(d.cfg.StateDir, "tokens"), "gw", "1234")
			toml = strings.Replace(toml, o.opKey, h.URI("op"), 1)
		}
		d.write(toml)
	}
	old, err := d.provision()
	if err != nil {
		t.Fatal(err)
	}
	spool := d.cfg.Telemetry.SpoolDir
	if err := os.MkdirAll(spool, 0o770); err != nil {
		t.Fatal(err)
	}
	// Messages staged on the same file system, renamed into the spool
	// while it is full (a rename needs no free block).
	stage := filepath.Join(d.cfg.StateDir, ".stage")
	os.Mkdir(stage, 0o700)
	for i := range 3 {
		if err := os.WriteFile(filepath.Join(stage, fmt.Sprintf("m%d.json", i)), []byte(fmt.Sprintf(`{"whileFull":%d}`, i)), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	send := func(i int) {
		t.Helper()
		if err := os.Rename(filepath.Join(stage, fmt.Sprintf("m%d.json", i)), filepath.Join(spool, fmt.Sprintf("m%d.json", i))); err != nil {
			t.Fatal(err)
		}
		testenv.Eventually(t, 20*time.Second, fmt.Sprintf("message %d delivered on the full disk", i), func() bool {
			return countBodies(az, devID, "whileFull") > i
		})
	}
	r := d.start()
	testenv.Eventually(t, 20*time.Second, "connected", func() bool { return d.status().State == "connected" })
	free := testenv.Fill(t, d.cfg.StateDir, inodes)
	send(0)
	// The renewal is due at half of the 60 s lifetime; it fails for want
	// of space, and is retried.
	allowRenewal(ft, old, 0.5)
	testenv.Eventually(t, 10*time.Second, "a renewal failing for want of space", func() bool {
		return strings.Count(r.log.String(), "certificate renewal failed") >= 2
	})
	assertDiskFullReported(t, d, r)
	assertOldIdentityIntact(t, d, old)
	if st := d.status(); st.State != "connected" || st.CertSerial != old.Serial {
		t.Fatalf("state %q with serial %s, want connected with the old certificate %s", st.State, st.CertSerial, old.Serial)
	}

	noCertificateAskedFor(t, r)

	// A restart (say, the gateway rebooted) on the still full disk.
	r.stop()
	r = d.start()
	testenv.Eventually(t, 30*time.Second, "the restarted agent connected with the old certificate", func() bool {
		st := d.status()
		return st.PID == os.Getpid() && st.State == "connected" && st.CertSerial == old.Serial
	})
	send(1)
	testenv.Eventually(t, 30*time.Second, "the restarted agent's renewal failing for want of space", func() bool {
		return strings.Contains(r.log.String(), "certificate renewal failed")
	})
	assertDiskFullReported(t, d, r)
	assertOldIdentityIntact(t, d, old)

	// Room for a key (one page, or one inode) but not for a whole
	// renewal.
	roomForOne(t, d, inodes)
	failed := strings.Count(r.log.String(), "certificate renewal failed")
	ft.Allow(6 * time.Second) // retries come every 0.5 to 2 s
	testenv.Eventually(t, 10*time.Second, "another failed renewal with room for the key only", func() bool {
		return strings.Count(r.log.String(), "certificate renewal failed") > failed+1
	})
	assertOldIdentityIntact(t, d, old)
	send(2)
	noCertificateAskedFor(t, r)

	// Space is freed: the renewal completes without a restart.
	free()
	ft.Allow(6 * time.Second) // a disk check
	testenv.Eventually(t, 10*time.Second, "renewed and connected with the new certificate", func() bool {
		cur, err := storeCurrent(d)
		st := d.status()
		return err == nil && cur.Serial != old.Serial && st.State == "connected" && st.CertSerial == cur.Serial
	})
	testenv.Eventually(t, 20*time.Second, "disk-full and renewal-failed cleared", func() bool {
		c := d.status().Conditions
		_, full := c[agent.CondDiskFull]
		_, failed := c[agent.CondRenewalFailed]
		return !full && !failed
	})
	cur := d.current()
	if keyExists(t, old.KeyURI) {
		t.Fatal("the old key is still there after the swap")
	}
	if !keyExists(t, cur.KeyURI) {
		t.Fatal("the new key is missing")
	}
	spoolPut(t, spool, "after.json", []byte(`{"afterRenewal":1}`))
	testenv.Eventually(t, 20*time.Second, "a message with the renewed certificate", func() bool {
		return countBodies(az, devID, "afterRenewal") == 1
	})
	if n := countBodies(az, devID, "whileFull"); n != 3 {
		t.Fatalf("%d of 3 messages sent while the disk was full arrived", n)
	}
	if strings.Contains(r.log.String(), "panic") {
		t.Fatal("panic in the log")
	}
}

// First provisioning on a full state directory: a clear error that says the
// disk is full and what to do, nothing half-stored; the agent started on
// the full disk says so in its status, and provisions and connects without
// a restart once space is freed.
func TestProvisionDiskFull(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	const devID = "gw-prov-diskfull"
	d := newDevice(t, az, devOpts{regID: devID})
	testenv.Tmpfs(t, d.cfg.StateDir, "size=2m,mode=0700")
	free := testenv.Fill(t, d.cfg.StateDir, false)

	_, err := d.provision()
	if err == nil {
		t.Fatal("provisioning succeeded on a full disk")
	}
	msg := err.Error()
	if !strings.Contains(msg, "no space left") || !strings.Contains(msg, "free space") || !strings.Contains(msg, d.cfg.StateDir) {
		t.Fatalf("error %q: want that the file system of the state directory is full and what to do", msg)
	}
	assertNotProvisioned(t, d)
	assertNoHalfWritten(t, d)

	// Room for the key but not for the identity.
	roomForOne(t, d, false)
	if _, err = d.provision(); err == nil || !strings.Contains(err.Error(), "free space") {
		t.Fatalf("provisioning with room for the key only: %v, want a full-disk error", err)
	}
	assertNotProvisioned(t, d)
	assertNoHalfWritten(t, d)
	free()
	free = testenv.Fill(t, d.cfg.StateDir, false)

	// The agent started on the fresh, full state directory starts: degraded,
	// saying the disk is full (in the log and to systemd: no status file
	// fits; `gwagent status` says so from the lock and the file system),
	// and provisions and connects without a restart once space is freed.
	r := d.start()
	testenv.Eventually(t, 30*time.Second, "the agent on a fresh full state directory running degraded, saying disk-full", func() bool {
		select {
		case err := <-r.done:
			r.done <- err
			t.Fatalf("the agent on a fresh full state directory stopped: %v", err)
		default:
		}
		l := r.log.String()
		return strings.Contains(l, "condition=disk-full") && strings.Contains(l, "to=degraded")
	})
	if !strings.Contains(r.log.String(), d.cfg.StateDir) {
		t.Fatalf("the log does not name the full file system:\n%s", r.log.String())
	}
	assertNotProvisioned(t, d)
	assertNoHalfWritten(t, d)
	free()
	testenv.Eventually(t, 30*time.Second, "provisioned and connected once space was freed, without a restart", func() bool {
		st := d.status()
		_, full := st.Conditions[agent.CondDiskFull]
		return st.State == "connected" && !full
	})
	testenv.Eventually(t, 10*time.Second, "the outbox id saved once there was room", func() bool {
		_, err := os.Stat(filepath.Join(d.cfg.StateDir, "outbox", "id"))
		return err == nil
	})
	r.stop()
	os.RemoveAll(filepath.Join(d.cfg.StateDir, "identity"))
	os.RemoveAll(d.cfg.StateDir + "/device.key")
	for _, f := range []string{"status.json", "transport.json", "renewal-seed"} {
		os.Remove(filepath.Join(d.cfg.StateDir, f))
	}

	// The agent ran before (DPS was out of reach), so its state directory
	// is set up; now provisioning fails for want of space: status and log
	// say so, and it provisions and connects without a restart once space
	// is freed.
	free()
	if st := az.Admin("POST", "/faults/refuse", map[string]any{"target": "dps", "seconds": 3600}, nil); st >= 300 {
		t.Fatalf("refuse: %d", st)
	}
	r = d.start()
	testenv.Eventually(t, 30*time.Second, "the agent set up its state directory, DPS out of reach", func() bool {
		_, err := os.Stat(filepath.Join(d.cfg.StateDir, "outbox", "id"))
		return err == nil && d.status().State == "provisioning"
	})
	r.stop()
	az.Admin("DELETE", "/faults", nil, nil)
	free = testenv.Fill(t, d.cfg.StateDir, false)
	r = d.start()
	testenv.Eventually(t, 30*time.Second, "disk-full and provisioning-failed in the status of the unprovisioned agent", func() bool {
		select {
		case err := <-r.done:
			r.done <- err
			t.Fatalf("the agent did not start on the full disk: %v", err)
		default:
		}
		c := d.status().Conditions
		_, full := c[agent.CondDiskFull]
		_, failed := c[agent.CondProvisioningFailed]
		return full && failed
	})
	assertDiskFullReported(t, d, r)
	if reason := d.status().Conditions[agent.CondProvisioningFailed]; !strings.Contains(reason, "free space") {
		t.Fatalf("provisioning-failed reason %q does not say the disk is full and what to do", reason)
	}
	assertNotProvisioned(t, d)
	assertNoHalfWritten(t, d)
	free()
	testenv.Eventually(t, 30*time.Second, "provisioned and connected after space was freed", func() bool {
		st := d.status()
		_, full := st.Conditions[agent.CondDiskFull]
		_, failed := st.Conditions[agent.CondProvisioningFailed]
		return st.State == "connected" && !full && !failed
	})
	assertNoHalfWritten(t, d)
	if _, err := storeCurrent(d); err != nil {
		t.Fatal(err)
	}
}

func assertDiskFullReported(t *testing.T, d *device, r *running) {
	t.Helper()
	reason, ok := d.status().Conditions[agent.CondDiskFull]
	if !ok {
		t.Fatalf("no disk-full condition in the status: %v", d.status().Conditions)
	}
	if !strings.Contains(reason, d.cfg.StateDir) || !strings.Contains(reason, "free space") || !strings.Contains(reason, "certificate") {
		t.Fatalf("the disk-full reason does not say where, what waits and what to do: %q", reason)
	}
	if !strings.Contains(r.log.String(), "condition=disk-full") {
		t.Fatal("no disk-full condition in the log")
	}
}

// assertOldIdentityIntact checks that old is still the committed identity
// and that nothing of a failed renewal is left.
func assertOldIdentityIntact(t *testing.T, d *device, old *provisioning.Identity) {
	t.Helper()
	s, err := provisioning.OpenStore(d.cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	cur, err := s.Current()
	if err != nil || cur.Serial != old.Serial || cur.Generation != old.Generation {
		t.Fatalf("current identity %v (%v), want the old one %s", cur, err, old.Serial)
	}
	if _, err := s.Next(); !errors.Is(err, provisioning.ErrNotProvisioned) {
		t.Fatalf("a staged identity is left: %v", err)
	}
	if !keyExists(t, old.KeyURI) {
		t.Fatal("the old key is gone")
	}
	assertNoHalfWritten(t, d)
}

// assertNoHalfWritten checks the state directory for leftovers of an
// interrupted write: temp files, generations no pointer names, keys no
// identity uses.
func assertNoHalfWritten(t *testing.T, d *device) {
	t.Helper()
	s, _ := provisioning.OpenStore(d.cfg.StateDir)
	cur, _ := s.Current()
	filepath.WalkDir(d.cfg.StateDir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(d.cfg.StateDir, p)
		switch {
		case rel == ".fill" || rel == ".stage" || rel == "tokens":
			return filepath.SkipDir
		case strings.HasPrefix(e.Name(), ".status.json.tmp-") && gone(p, 2*time.Second):
			// The running agent's status tracker was writing status.json
			// at that moment: a write in progress, not one left behind.
		case strings.Contains(e.Name(), ".tmp-"):
			t.Errorf("temp file left: %s", rel)
		case strings.HasSuffix(e.Name(), ".key") && (cur == nil || "file:"+p != cur.KeyURI):
			t.Errorf("a key no identity uses is left: %s", rel)
		case strings.HasSuffix(e.Name(), ".tpmkey") && (cur == nil || !strings.Contains(cur.KeyURI, "blob="+p)):
			t.Errorf("a TPM key blob no identity uses is left: %s", rel)
		case filepath.Dir(rel) == "identity" && strings.HasPrefix(e.Name(), "gen-") && (cur == nil || e.Name() != cur.Generation):
			t.Errorf("a generation no pointer names is left: %s", rel)
		case rel == filepath.Join("identity", "next"):
			t.Errorf("a staged identity is left")
		}
		return nil
	})
}

// gone reports whether the file at p is removed (or renamed away) within d.
func gone(p string, d time.Duration) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
			return true
		}
	}
	return false
}

// roomForOne frees one page (or one inode) of the filled file system.
func roomForOne(t *testing.T, d *device, inodes bool) {
	t.Helper()
	fill := filepath.Join(d.cfg.StateDir, ".fill")
	if inodes {
		if err := os.Remove(filepath.Join(fill, "0")); err != nil {
			t.Fatal(err)
		}
		return
	}
	st, err := os.Stat(filepath.Join(fill, "blocks"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(fill, "blocks"), st.Size()-4096); err != nil {
		t.Fatal(err)
	}
}

// A renewal that failed for want of space is retried as soon as space is
// freed, not after its backoff (retry_max is an hour by default; ten
// minutes here). The agent and azsim share a fake clock: it jumps past the
// planned renewal of the two-hour certificate, and then may move only a
// minute, well short of the ten-minute retry.
func TestRenewalRetriedOnceSpaceFreed(t *testing.T) {
	t.Parallel()
	ft := testenv.StartFakeTime(t, time.Now())
	ft.Allow(time.Minute) // provisioning and connecting: DPS's retry-after, backoff
	az := azsimtest.Start(t, azsim.Config{CertLifetime: 2 * time.Hour, Now: ft.Now})
	const devID = "gw-renew-space-freed"
	d := newDevice(t, az, devOpts{regID: devID, extra: `
[renewal]
threshold = 0.5
jitter = "1s"
floor = "1s"
retry_min = "10m"
retry_max = "10m"
issue_timeout = "10s"
`})
	d.clock = ft
	testenv.Tmpfs(t, d.cfg.StateDir, "size=2m,nr_inodes=256,mode=0700")
	old, err := d.provision()
	if err != nil {
		t.Fatal(err)
	}
	r := d.start()
	testenv.Eventually(t, 20*time.Second, "connected", func() bool { return d.status().State == "connected" })
	free := testenv.Fill(t, d.cfg.StateDir, true)
	ft.Jump(65 * time.Minute) // past the planned renewal
	testenv.Eventually(t, 20*time.Second, "a renewal failing for want of space", func() bool {
		return strings.Contains(r.log.String(), "certificate renewal failed")
	})
	assertDiskFullReported(t, d, r)
	assertOldIdentityIntact(t, d, old)
	noCertificateAskedFor(t, r)

	free()
	ft.Allow(time.Minute)
	testenv.Eventually(t, 10*time.Second, "renewed without waiting out the ten-minute backoff", func() bool {
		cur, err := storeCurrent(d)
		return err == nil && cur.Serial != old.Serial
	})
	testenv.Eventually(t, 10*time.Second, "connected with the new certificate, disk-full cleared", func() bool {
		cur, err := storeCurrent(d)
		st := d.status()
		_, full := st.Conditions[agent.CondDiskFull]
		return err == nil && st.State == "connected" && st.CertSerial == cur.Serial && !full
	})
}

// noCertificateAskedFor checks that the agent did not ask the hub for a
// certificate.
func noCertificateAskedFor(t *testing.T, r *running) {
	t.Helper()
	if strings.Contains(r.log.String(), "the hub accepted the certificate request") {
		t.Fatal("the agent asked the hub for a certificate while it had no room to store it")
	}
}
