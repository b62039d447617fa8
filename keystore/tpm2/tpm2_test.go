package tpm2

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	tpm "github.com/google/go-tpm/tpm2"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/keystoretest"
)

func openSock(t *testing.T, sock string) keystore.KeyStore {
	t.Helper()
	s, err := Open(context.Background(), keystore.MustParse("tpm2:socket="+sock+";blob=/unused"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConformanceBlob(t *testing.T) {
	sw := testenv.StartSWTPM(t)
	dir := t.TempDir()
	keystoretest.Run(t, keystoretest.Backend{
		Open: func(t *testing.T) keystore.KeyStore { return openSock(t, sw.Sock) },
		KeyURI: func(t *testing.T, name string) *keystore.URI {
			return keystore.MustParse(fmt.Sprintf("tpm2:socket=%s;blob=%s", sw.Sock, filepath.Join(dir, name+".tpmkey")))
		},
	})
}

func TestConformanceHandle(t *testing.T) {
	sw := testenv.StartSWTPM(t)
	next := uint32(0x81000100)
	names := map[string]uint32{}
	keystoretest.Run(t, keystoretest.Backend{
		Open: func(t *testing.T) keystore.KeyStore { return openSock(t, sw.Sock) },
		KeyURI: func(t *testing.T, name string) *keystore.URI {
			h, ok := names[name]
			if !ok {
				h = next
				next += 2
				names[name] = h
			}
			return keystore.MustParse(fmt.Sprintf("tpm2:socket=%s;handle=0x%08X", sw.Sock, h))
		},
	})
}

// Keys survive a TPM restart (a reboot): by handle and by blob.
func TestRestartAndLeaks(t *testing.T) {
	ctx := context.Background()
	sw := testenv.StartSWTPM(t)
	dir := t.TempDir()
	uris := []*keystore.URI{
		keystore.MustParse(fmt.Sprintf("tpm2:socket=%s;handle=0x81000200", sw.Sock)),
		keystore.MustParse(fmt.Sprintf("tpm2:socket=%s;blob=%s", sw.Sock, filepath.Join(dir, "k.tpmkey"))),
	}
	s := openSock(t, sw.Sock).(*Store)
	pubs := map[int]*ecdsa.PublicKey{}
	for i, u := range uris {
		k, err := s.CreateKey(ctx, u)
		if err != nil {
			t.Fatal(err)
		}
		pubs[i] = k.Public().(*ecdsa.PublicKey)
		for range 5 {
			sign(t, k)
		}
	}
	if hs, err := s.transientHandles(); err != nil || len(hs) != 0 {
		t.Fatalf("fail/transient handles left after create and sign: %v (%v)", hs, err)
	}
	// Errors must not leak either.
	if _, err := s.CreateKey(ctx, uris[0]); !errors.Is(err, keystore.ErrKeyExists) {
		t.Fatalf("second create: %v", err)
	}
	if hs, _ := s.transientHandles(); len(hs) != 0 {
		t.Fatalf("fail/transient handles left after a failed create: %v", hs)
	}
	s.Close()

	sw.Restart()
	s2 := openSock(t, sw.Sock)
	defer s2.Close()
	for i, u := range uris {
		k, err := s2.Signer(ctx, u)
		if err != nil {
			t.Fatalf("after restart: %v", err)
		}
		if !k.Public().(*ecdsa.PublicKey).Equal(pubs[i]) {
			t.Fatal("after restart the key is another one")
		}
		sign(t, k)
	}
}

func sign(t *testing.T, k crypto.Signer) {
	t.Helper()
	d := sha512.Sum384([]byte("gwagent"))
	sig, err := k.Sign(rand.Reader, d[:], crypto.SHA384)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(k.Public().(*ecdsa.PublicKey), d[:], sig) {
		t.Fatal("signature does not verify")
	}
}

// fakeTPM answers every command with a GetCapability response listing only
// P-256. A mock, because no real TPM (or swtpm) can be told to lack P-384.
type fakeTPM struct{}

func (fakeTPM) Send([]byte) ([]byte, error) {
	rsp := &tpm.GetCapabilityResponse{CapabilityData: tpm.TPMSCapabilityData{
		Capability: tpm.TPMCapECCCurves,
		Data:       tpm.NewTPMUCapabilities(tpm.TPMCapECCCurves, &tpm.TPMLECCCurve{ECCCurves: []tpm.TPMECCCurve{tpm.TPMECCNistP256}}),
	}}
	pre, err := tpm.MarshalResponse(tpm.GetCapability{}, rsp) // rc || cc || parameters
	if err != nil {
		return nil, err
	}
	params := pre[8:]
	out := binary.BigEndian.AppendUint16(nil, 0x8001) // TPM_ST_NO_SESSIONS
	out = binary.BigEndian.AppendUint32(out, uint32(10+len(params)))
	out = binary.BigEndian.AppendUint32(out, 0) // TPM_RC_SUCCESS
	return append(out, params...), nil
}
func (fakeTPM) Close() error { return nil }

func TestErrors(t *testing.T) {
	t.Run("fail/TPM without P-384", func(t *testing.T) {
		// It opens (the EK can still be the onboarding credential), but no
		// key operation reaches the TPM.
		s, err := New(fakeTPM{}, "fake")
		if err != nil {
			t.Fatal(err)
		}
		u := keystore.MustParse("tpm2:socket=/x;blob=/nonexistent/k.tpmkey")
		if _, err := s.CreateKey(context.Background(), u); !errors.Is(err, keystore.ErrUnsupportedCurve) || !strings.Contains(err.Error(), "P-384") {
			t.Fatalf("create: got %v", err)
		}
		if _, err := s.Signer(context.Background(), u); !errors.Is(err, keystore.ErrUnsupportedCurve) {
			t.Fatalf("signer: got %v", err)
		}
	})
	t.Run("fail/no TPM device", func(t *testing.T) {
		_, err := Open(context.Background(), keystore.MustParse("tpm2:device=/dev/nonexistent-tpm;handle=0x81000100"))
		if !errors.Is(err, keystore.ErrDeviceAbsent) || !strings.Contains(err.Error(), "/dev/nonexistent-tpm") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("fail/swtpm not running", func(t *testing.T) {
		_, err := Open(context.Background(), keystore.MustParse("tpm2:socket=/tmp/no-such-swtpm.sock;blob=/x"))
		if !errors.Is(err, keystore.ErrDeviceAbsent) || !strings.Contains(err.Error(), "swtpm") {
			t.Fatalf("got %v", err)
		}
	})
}

// A persistent handle holding something that is not ours (here a storage
// key, as platforms keep at 0x81000001) is never used nor evicted, not even
// by `keygen --force`.
func TestForeignHandle(t *testing.T) {
	ctx := context.Background()
	sw := testenv.StartSWTPM(t)
	s := openSock(t, sw.Sock).(*Store)
	defer s.Close()
	const h = 0x81000010
	err := s.locked(func() error {
		cp, err := tpm.CreatePrimary{PrimaryHandle: tpm.TPMRHOwner, InPublic: tpm.New2B(tpm.ECCSRKTemplate)}.Execute(s.tpm)
		if err != nil {
			return err
		}
		defer s.flush(cp.ObjectHandle)
		_, err = tpm.EvictControl{Auth: tpm.TPMRHOwner, ObjectHandle: &tpm.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
			PersistentHandle: tpm.TPMHandle(h)}.Execute(s.tpm)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	u := keystore.MustParse(fmt.Sprintf("tpm2:socket=%s;handle=0x%08X", sw.Sock, h))
	if _, err := s.Signer(ctx, u); err == nil || !strings.Contains(err.Error(), "another kind of object") {
		t.Fatalf("fail/signer on a storage key: %v", err)
	}
	if err := s.DeleteKey(ctx, u); err == nil {
		t.Fatal("fail/deleted a storage key")
	}
	if _, _, ok, _ := s.persisted(h); !ok {
		t.Fatal("fail/the storage key is gone")
	}
}

// countingTPM records the command codes sent to the TPM.
type countingTPM struct {
	inner interface {
		Send([]byte) ([]byte, error)
		Close() error
	}
	cmds []uint32
}

func (c *countingTPM) Send(cmd []byte) ([]byte, error) {
	if len(cmd) >= 10 {
		c.cmds = append(c.cmds, binary.BigEndian.Uint32(cmd[6:10]))
	}
	return c.inner.Send(cmd)
}

func (c *countingTPM) Close() error { return c.inner.Close() }

func (c *countingTPM) count(cc tpm.TPMCC) int {
	n := 0
	for _, x := range c.cmds {
		if x == uint32(cc) {
			n++
		}
	}
	return n
}

// TestSRKPersisted: the first key creation makes the standard SRK
// persistent at 0x81000001; a later start (a new Store) signs with a blob
// key without any CreatePrimary.
func TestSRKPersisted(t *testing.T) {
	ctx := context.Background()
	sw := testenv.StartSWTPM(t)
	blob := keystore.MustParse(fmt.Sprintf("tpm2:socket=%s;blob=%s", sw.Sock, filepath.Join(t.TempDir(), "k.tpmkey")))
	s := openSock(t, sw.Sock).(*Store)
	k, err := s.CreateKey(ctx, blob)
	if err != nil {
		t.Fatal(err)
	}
	pub := k.Public().(*ecdsa.PublicKey)
	s.Close()

	s2 := openSock(t, sw.Sock).(*Store)
	defer s2.Close()
	rp, err := (tpm.ReadPublic{ObjectHandle: srkHandle}).Execute(s2.tpm)
	if err != nil || !isStorageKey(&rp.OutPublic) {
		t.Fatalf("no storage key persisted at 0x81000001 after the first key: %v", err)
	}
	c := &countingTPM{inner: s2.tpm}
	s2.tpm = c
	k2, err := s2.Signer(ctx, blob)
	if err != nil {
		t.Fatal(err)
	}
	if !k2.Public().(*ecdsa.PublicKey).Equal(pub) {
		t.Fatal("key changed across starts")
	}
	sign(t, k2)
	if n := c.count(tpm.TPMCCCreatePrimary); n != 0 {
		t.Fatalf("%d CreatePrimary on a start with a stored key; want 0", n)
	}
	if c.count(tpm.TPMCCSign) != 1 {
		t.Fatalf("commands sent: %x", c.cmds)
	}
}
