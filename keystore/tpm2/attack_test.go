package tpm2

// Attacks on the TPM attestation and key code: a process SIGKILLed in the
// middle of a TPM operation, on a swtpm socket (no resource manager), as a
// gateway loses power or the OOM killer strikes. The child is this test
// binary re-executed; it kills itself with a real SIGKILL right after the
// TPM answered the named command (before it could flush anything), or
// while the TPM is still working on it.

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	tpm "github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/gwagent/gwagent/azsim/dps"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore"
)

const attackChildEnv = "GWAGENT_TPM_ATTACK_CHILD"

func TestMain(m *testing.M) {
	if v := os.Getenv(attackChildEnv); v != "" {
		os.Exit(attackChild(v))
	}
	os.Exit(m.Run())
}

// killer SIGKILLs its own process at the nth command of code cc: after the
// TPM answered it (after=true), or once the command is sent to the TPM and
// before its answer is read.
type killer struct {
	transport.TPMCloser
	sock  string
	cc    tpm.TPMCC
	nth   int
	after bool
	n     int
}

func (k *killer) Send(cmd []byte) ([]byte, error) {
	hit := false
	if len(cmd) >= 10 && tpm.TPMCC(binary.BigEndian.Uint32(cmd[6:10])) == k.cc {
		k.n++
		hit = k.n == k.nth
	}
	if hit && !k.after {
		c, err := net.Dial("unix", k.sock)
		if err != nil {
			return nil, err
		}
		if _, err := c.Write(cmd); err != nil {
			return nil, err
		}
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	rsp, err := k.TPMCloser.Send(cmd)
	if hit {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	return rsp, err
}

// attackChild runs "op|sock|cc|nth|after|blob" and is killed on the way;
// exit status 3 means it was not.
func attackChild(spec string) int {
	f := strings.Split(spec, "|")
	cc, _ := strconv.ParseUint(f[2], 0, 32)
	nth, _ := strconv.Atoi(f[3])
	tr, err := linuxudstpm.Open(f[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	s, err := New(&killer{TPMCloser: tr, sock: f[1], cc: tpm.TPMCC(cc), nth: nth, after: f[4] == "after"}, f[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx := context.Background()
	switch f[0] {
	case "attest":
		ek, srk, err := s.DPSPublics(ctx)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		blob, _, err := dps.TPMChallenge(ek, srk)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		if _, err := s.DPSSign(ctx, blob, []byte("token")); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
	case "create":
		k, err := s.CreateKey(ctx, keystore.MustParse("tpm2:socket="+f[1]+";blob="+f[5]))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		d := make([]byte, 48)
		if _, err := k.Sign(nil, d, crypto.SHA384); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
	}
	return 3
}

// killChild runs op in a child process that SIGKILLs itself at the nth
// command cc, and fails unless it died of that SIGKILL.
func killChild(t *testing.T, op, sock string, cc tpm.TPMCC, nth int, after bool, blob string) {
	t.Helper()
	when := "before"
	if after {
		when = "after"
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s|%s|0x%x|%d|%s|%s", attackChildEnv, op, sock, uint32(cc), nth, when, blob))
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("the child was not killed (err %v): %s", err, out)
	}
	ws, _ := ee.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("the child ended with %v, not SIGKILL: %s", err, out)
	}
}

// leftovers lists what the TPM holds: transient objects and sessions.
func leftovers(t *testing.T, sock string) []tpm.TPMHandle {
	t.Helper()
	tr, err := linuxudstpm.Open(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	s := &Store{tpm: tr, name: sock}
	var all []tpm.TPMHandle
	for _, ht := range staleKinds {
		hs, err := s.handles(ht)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, hs...)
	}
	return all
}

// Without a resource manager a killed process's objects and sessions stay
// in the TPM; Open flushes them, so no number of kills at any point of the
// attestation keeps the device from attesting.
func TestSIGKILLDuringAttestation(t *testing.T) {
	ctx := context.Background()
	sw := testenv.StartSWTPM(t)

	// First show the leak is real and fatal: one kill while the EK and
	// the SRK are loaded, and a store that does not flush cannot attest.
	killChild(t, "attest", sw.Sock, tpm.TPMCCActivateCredential, 1, true, "")
	left := leftovers(t, sw.Sock)
	t.Logf("after a kill at ActivateCredential the TPM holds %#x", left)
	if len(left) != 3 {
		t.Fatalf("the TPM holds %#x after a kill with the EK, the SRK and the policy session loaded; the simulation is broken", left)
	}
	raw := unflushed(t, sw.Sock)
	ek, srk, err := raw.DPSPublics(ctx)
	if err == nil {
		blob, _, _ := dps.TPMChallenge(ek, srk)
		_, err = raw.DPSSign(ctx, blob, []byte("x"))
	}
	raw.Close()
	if !errors.Is(err, tpm.TPMRCObjectMemory) {
		t.Fatalf("attesting next to the leftovers: got %v, want TPM_RC_OBJECT_MEMORY (libtpms has 3 object slots)", err)
	}
	attestOK(t, sw.Sock, len(left))

	for _, p := range []struct {
		name  string
		cc    tpm.TPMCC
		nth   int
		after bool
	}{
		{"deriving the EK", tpm.TPMCCCreatePrimary, 1, false},
		{"EK derived, not yet saved", tpm.TPMCCCreatePrimary, 1, true},
		{"RSA SRK derived", tpm.TPMCCCreatePrimary, 2, true},
		{"EK reloaded next to the SRK", tpm.TPMCCContextLoad, 2, true},
		{"EK policy session started", tpm.TPMCCStartAuthSession, 1, true},
		{"PolicySecret done", tpm.TPMCCPolicySecret, 1, true},
		{"in ActivateCredential", tpm.TPMCCActivateCredential, 1, false},
		{"HMAC key imported", tpm.TPMCCImport, 1, true},
		{"HMAC key loaded", tpm.TPMCCLoad, 1, true},
		{"in TPM2_HMAC", tpm.TPMCCHMAC, 1, false},
		{"token signed, key not flushed", tpm.TPMCCHMAC, 1, true},
	} {
		name := p.name
		t.Run(name, func(t *testing.T) {
			killChild(t, "attest", sw.Sock, p.cc, p.nth, p.after, "")
			left := leftovers(t, sw.Sock)
			t.Logf("the killed process left %#x", left)
			attestOK(t, sw.Sock, len(left))
		})
	}
}

// unflushed opens a Store that neither flushes at open nor when the TPM is
// full (New, as over a resource manager): what gwagent did before.
func unflushed(t *testing.T, sock string) *Store {
	t.Helper()
	tr, err := linuxudstpm.Open(sock)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(tr, sock)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// attestOK opens the TPM as the agent does after a restart: it must flush
// the stale handles (want of them), attest, and leave nothing behind.
func attestOK(t *testing.T, sock string, want int) {
	t.Helper()
	ctx := context.Background()
	s := openSock(t, sock).(*Store)
	defer s.Close()
	if n := s.StaleFlushed(); n != want {
		t.Errorf("Open flushed %d stale handles, want %d", n, want)
	}
	ek, srk, err := s.DPSPublics(ctx)
	if err != nil {
		t.Fatalf("after the kill: %v", err)
	}
	blob, _, err := dps.TPMChallenge(ek, srk)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.DPSSign(ctx, blob, []byte("token")); err != nil {
		t.Fatalf("after the kill the TPM cannot attest: %v", err)
	}
	noLeaks(t, s)
}

// A kill between persisting the SRK and flushing its transient copy leaves
// both: the next start flushes the copy and uses the persisted SRK.
func TestSIGKILLWhilePersistingTheSRK(t *testing.T) {
	ctx := context.Background()
	sw := testenv.StartSWTPM(t)
	dir := t.TempDir()
	blob := filepath.Join(dir, "op.tpmkey")
	killChild(t, "create", sw.Sock, tpm.TPMCCEvictControl, 1, true, blob)
	left := leftovers(t, sw.Sock)
	if len(left) != 1 {
		t.Fatalf("the TPM holds %#x, want the SRK's transient copy", left)
	}
	if _, err := os.Lstat(blob); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a key blob exists although the process died before creating the key: %v", err)
	}
	s := openSock(t, sw.Sock).(*Store)
	defer s.Close()
	if s.StaleFlushed() != 1 {
		t.Fatalf("Open flushed %d, want 1", s.StaleFlushed())
	}
	rp, err := (tpm.ReadPublic{ObjectHandle: srkHandle}).Execute(s.tpm)
	if err != nil || !isStorageKey(&rp.OutPublic) {
		t.Fatalf("the SRK persisted before the kill is not at 0x%08X: %v", uint32(srkHandle), err)
	}
	c := &countCC{TPMCloser: s.tpm, cc: tpm.TPMCCCreatePrimary}
	s.tpm = c
	k, err := s.CreateKey(ctx, keystore.MustParse("tpm2:socket="+sw.Sock+";blob="+blob))
	if err != nil {
		t.Fatal(err)
	}
	sign(t, k)
	if c.n != 0 {
		t.Fatalf("%d CreatePrimary: the persisted SRK was not reused", c.n)
	}
	noLeaks(t, s)

	// A kill after the key blob was written and while the key is loaded
	// for signing: the blob is whole and the key signs after a restart.
	blob2 := filepath.Join(dir, "op2.tpmkey")
	killChild(t, "create", sw.Sock, tpm.TPMCCSign, 1, false, blob2)
	s2 := openSock(t, sw.Sock).(*Store)
	defer s2.Close()
	k2, err := s2.Signer(ctx, keystore.MustParse("tpm2:socket="+sw.Sock+";blob="+blob2))
	if err != nil {
		t.Fatalf("the key created before the kill: %v", err)
	}
	sign(t, k2)
	noLeaks(t, s2)
}

// Stale handles are flushed only where no resource manager does it: never
// through /dev/tpmrm0, where other processes' objects are live and the
// kernel cleans up after a dead one.
func TestManaged(t *testing.T) {
	dir := t.TempDir()
	link := filepath.Join(dir, "tpm")
	os.WriteFile(filepath.Join(dir, "tpmrm0"), nil, 0o600)
	os.Symlink(filepath.Join(dir, "tpmrm0"), link)
	for path, want := range map[string]bool{
		"/dev/tpmrm0": true, "/dev/tpmrm1": true, link: true,
		"/dev/tpm0": false, "/run/swtpm/tpm.sock": false,
	} {
		if got := managed(path); got != want {
			t.Errorf("managed(%s) = %v, want %v", path, got, want)
		}
	}
}

// onCommand calls f once, after the TPM answered the first command cc.
type onCommand struct {
	transport.TPMCloser
	cc   tpm.TPMCC
	f    func()
	done bool
}

func (o *onCommand) Send(cmd []byte) ([]byte, error) {
	rsp, err := o.TPMCloser.Send(cmd)
	if !o.done && len(cmd) >= 10 && tpm.TPMCC(binary.BigEndian.Uint32(cmd[6:10])) == o.cc {
		o.done = true
		o.f()
	}
	return rsp, err
}

// swtpm killed in the middle of the challenge: the error says which TPM
// is gone and what to do, is keystore.ErrDeviceAbsent (retried by the
// agent), not a refused challenge or a missing key, and the same Store
// works again once swtpm is back on its state.
func TestSWTPMVanishes(t *testing.T) {
	ctx := context.Background()
	sw := testenv.StartSWTPM(t)
	s := openSock(t, sw.Sock).(*Store)
	defer s.Close()
	keyURI := keystore.MustParse("tpm2:socket=" + sw.Sock + ";handle=0x81000100")
	if _, err := s.CreateKey(ctx, keyURI); err != nil {
		t.Fatal(err)
	}
	ek, srk, err := s.DPSPublics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	inner := s.tpm
	// Each unclean swtpm stop after DPS's HMAC key was used counts as a
	// failed authorization (see TestLockoutAfterUncleanResets): three
	// stops stay below swtpm's limit.
	for _, cc := range []tpm.TPMCC{tpm.TPMCCStartAuthSession, tpm.TPMCCActivateCredential, tpm.TPMCCImport} {
		t.Run(fmt.Sprintf("after command 0x%x", uint32(cc)), func(t *testing.T) {
			s.tpm = &onCommand{TPMCloser: inner, cc: cc, f: sw.Stop}
			blob, _, err := dps.TPMChallenge(ek, srk)
			if err != nil {
				t.Fatal(err)
			}
			_, err = s.DPSSign(ctx, blob, []byte("token"))
			t.Log(err)
			if !errors.Is(err, keystore.ErrDeviceAbsent) || errors.Is(err, ErrChallenge) {
				t.Fatalf("got %v, want keystore.ErrDeviceAbsent and not a refused challenge", err)
			}
			if msg := err.Error(); !strings.Contains(msg, sw.Sock) || !strings.Contains(msg, "swtpm") {
				t.Fatalf("the error does not name the TPM and what to do: %v", err)
			}
			if _, err := s.Signer(ctx, keyURI); !errors.Is(err, keystore.ErrDeviceAbsent) {
				t.Fatalf("the key while swtpm is gone: got %v, want ErrDeviceAbsent (not a missing key)", err)
			}
			if _, _, err := s.DPSPublics(ctx); !errors.Is(err, keystore.ErrDeviceAbsent) {
				t.Fatalf("DPSPublics while swtpm is gone: got %v", err)
			}
			s.tpm = inner
			sw.Restart()
			blob, _, _ = dps.TPMChallenge(ek, srk)
			if _, err := s.DPSSign(ctx, blob, []byte("token")); err != nil {
				t.Fatalf("after swtpm is back: %v", err)
			}
			k, err := s.Signer(ctx, keyURI)
			if err != nil {
				t.Fatal(err)
			}
			sign(t, k)
			noLeaks(t, s)
		})
	}
}

// A TPM counts each reset without TPM2_Shutdown after a DA-protected key
// was used as a failed authorization (swtpm: 3 allowed, one forgiven per
// 1000 s). gwagent's own keys have no authorization value and are made
// with NoDA, so a gateway losing power over and over keeps signing; DPS's
// HMAC key is DA-protected (its template is DPS's), and its lockout is
// reported with what to do.
func TestLockoutAfterUncleanResets(t *testing.T) {
	ctx := context.Background()
	sw := testenv.StartSWTPM(t)
	keyURI := keystore.MustParse("tpm2:socket=" + sw.Sock + ";blob=" + filepath.Join(t.TempDir(), "op.tpmkey"))
	s := openSock(t, sw.Sock).(*Store)
	k, err := s.CreateKey(ctx, keyURI)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for range 5 {
		sign(t, k)
		sw.Stop() // power cut
		sw.Restart()
	}
	sign(t, k)

	ek, srk, err := s.DPSPublics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	attest := func() error {
		blob, _, err := dps.TPMChallenge(ek, srk)
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.DPSSign(ctx, blob, []byte("token"))
		return err
	}
	for i := range 3 {
		if err := attest(); err != nil {
			t.Fatalf("attestation %d: %v", i, err)
		}
		sw.Stop()
		sw.Restart()
	}
	err = attest()
	t.Log(err)
	if !errors.Is(err, tpm.TPMRCLockout) || !strings.Contains(err.Error(), "tpm2_dictionarylockout --clear-lockout") ||
		!strings.Contains(err.Error(), "16m40s") || !strings.Contains(err.Error(), sw.Sock) {
		t.Fatalf("after three power cuts: got %v, want the lockout explained (which TPM, when it unlocks, how to unlock it)", err)
	}
	sign(t, k) // NoDA: the operational key still signs
	// What tpm2_dictionarylockout --clear-lockout sends (go-tpm has no
	// TPM2_DictionaryAttackLockReset): lockout hierarchy, empty password.
	cmd := []byte{0x80, 0x02, 0, 0, 0, 27, 0, 0, 0x01, 0x39, 0x40, 0, 0, 0x0A, 0, 0, 0, 9, 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0}
	if rsp, err := s.tpm.Send(cmd); err != nil || len(rsp) < 10 || binary.BigEndian.Uint32(rsp[6:10]) != 0 {
		t.Fatalf("TPM2_DictionaryAttackLockReset: %x %v", rsp, err)
	}
	if err := attest(); err != nil {
		t.Fatalf("after the lockout was cleared: %v", err)
	}
	noLeaks(t, s)
}

// fill runs cmd through its own connection to swtpm and never flushes what
// it makes, as a buggy or killed program beside the agent would, until the
// TPM has no room for another; it returns how many it left.
func fill(t *testing.T, sock, what string, cmd func(transport.TPM) error) int {
	t.Helper()
	tr, err := linuxudstpm.Open(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	for n := 0; n < 128; n++ {
		err := cmd(tr)
		if errors.Is(err, tpm.TPMRCObjectMemory) || errors.Is(err, tpm.TPMRCSessionMemory) || errors.Is(err, tpm.TPMRCSessionHandles) {
			return n
		}
		if err != nil {
			t.Fatalf("leaking %s: %v", what, err)
		}
	}
	t.Fatalf("128 %s left and the TPM is not full", what)
	return 0
}

func leakObjects(t *testing.T, sock string) int {
	t.Helper()
	return fill(t, sock, "objects", func(tr transport.TPM) error {
		_, err := tpm.CreatePrimary{PrimaryHandle: tpm.TPMRHOwner, InPublic: tpm.New2B(tpm.ECCSRKTemplate)}.Execute(tr)
		return err
	})
}

func leakSessions(t *testing.T, sock string) int {
	t.Helper()
	return fill(t, sock, "sessions", func(tr transport.TPM) error {
		_, err := tpm.StartAuthSession{
			TPMKey: tpm.TPMRHNull, Bind: tpm.TPMRHNull, SessionType: tpm.TPMSEHMAC,
			NonceCaller: tpm.TPM2BNonce{Buffer: make([]byte, 16)},
			Symmetric:   tpm.TPMTSymDef{Algorithm: tpm.TPMAlgNull},
			AuthHash:    tpm.TPMAlgSHA256,
		}.Execute(tr)
		return err
	})
}

// Another program leaks objects and sessions into a TPM without a resource
// manager after the store opened (the flush at open is long past): the
// store's next operation finds the TPM full, flushes what it does not hold
// and tries once more, so the agent keeps signing and attesting instead of
// failing with TPM_RC_OBJECT_MEMORY until it is restarted.
func TestLeakAfterOpen(t *testing.T) {
	ctx := context.Background()
	sw := testenv.StartSWTPM(t)
	dir := t.TempDir()
	u := keystore.MustParse(fmt.Sprintf("tpm2:socket=%s;blob=%s", sw.Sock, filepath.Join(dir, "k.tpmkey")))
	s := openSock(t, sw.Sock).(*Store)
	defer s.Close()
	k, err := s.CreateKey(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	sign(t, k)

	// The leak is real and fatal to a store that does not flush.
	n := leakObjects(t, sw.Sock)
	t.Logf("leaked %d objects; the TPM is full", n)
	raw := unflushed(t, sw.Sock)
	rk, err := raw.Signer(ctx, u)
	if err == nil {
		d := sha512.Sum384([]byte("x"))
		_, err = rk.Sign(rand.Reader, d[:], crypto.SHA384)
	}
	raw.Close()
	if !errors.Is(err, tpm.TPMRCObjectMemory) {
		t.Fatalf("signing next to the leak: got %v, want TPM_RC_OBJECT_MEMORY; the simulation is broken", err)
	}

	t.Run("objects, then sign", func(t *testing.T) {
		sign(t, k)
		if left := leftovers(t, sw.Sock); len(left) != 0 {
			t.Fatalf("the TPM still holds %#x", left)
		}
	})
	t.Run("objects, then create", func(t *testing.T) {
		leakObjects(t, sw.Sock)
		u2 := keystore.MustParse(fmt.Sprintf("tpm2:socket=%s;blob=%s;handle=0x81000300", sw.Sock, filepath.Join(dir, "k2.tpmkey")))
		k2, err := s.CreateKey(ctx, u2)
		if err != nil {
			t.Fatal(err)
		}
		leakObjects(t, sw.Sock)
		sign(t, k2)
	})
	t.Run("objects and sessions, then attest", func(t *testing.T) {
		leakObjects(t, sw.Sock)
		t.Logf("leaked %d sessions", leakSessions(t, sw.Sock))
		ek, srk, err := s.DPSPublics(ctx)
		if err != nil {
			t.Fatal(err)
		}
		leakObjects(t, sw.Sock)
		leakSessions(t, sw.Sock)
		blob, _, err := dps.TPMChallenge(ek, srk)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.DPSSign(ctx, blob, []byte("token")); err != nil {
			t.Fatalf("attesting after another program filled the TPM: %v", err)
		}
		if left := leftovers(t, sw.Sock); len(left) != 0 {
			t.Fatalf("the TPM still holds %#x", left)
		}
	})
}
