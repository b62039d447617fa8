package tpm2

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"

	tpm "github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/gwagent/gwagent/azsim/dps"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// openStore opens a fresh swtpm as a *Store.
func openStore(t *testing.T) *Store {
	t.Helper()
	sw := testenv.StartSWTPM(t)
	s := openSock(t, sw.Sock).(*Store)
	t.Cleanup(func() { s.Close() })
	return s
}

// noLeaks fails if any transient object or session is left in the TPM.
func noLeaks(t *testing.T, s *Store) {
	t.Helper()
	hs, err := s.transientHandles()
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 0 {
		t.Errorf("transient objects left in the TPM: %v", hs)
	}
	for _, ht := range []tpm.TPMHT{tpm.TPMHTHMACSession, tpm.TPMHTPolicySession} {
		rsp, err := tpm.GetCapability{Capability: tpm.TPMCapHandles, Property: uint32(ht) << 24, PropertyCount: 16}.Execute(s.tpm)
		if err != nil {
			t.Fatal(err)
		}
		l, _ := rsp.CapabilityData.Data.Handles()
		if len(l.Handle) != 0 {
			t.Errorf("sessions left in the TPM: %v", l.Handle)
		}
	}
}

// The device half against azsim's independent DPS half: the TPM opens the
// challenge and its TPM2_HMAC equals an HMAC with the key DPS put in it.
func TestDPSChallenge(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	ek, srk, err := s.DPSPublics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Deterministic: the same EK and SRK each time (DPS compares the EK).
	ek2, srk2, err := s.DPSPublics(ctx)
	if err != nil || string(ek) != string(ek2) || string(srk) != string(srk2) {
		t.Fatalf("EK/SRK differ between calls (err %v)", err)
	}
	blob, key, err := dps.TPMChallenge(ek, srk)
	if err != nil {
		t.Fatal(err)
	}
	blob0 := blob
	msg := []byte("0ne00AZSIM0%2Fregistrations%2Fdev-1\n1700000000")
	got, err := s.DPSSign(ctx, blob, msg)
	if err != nil {
		t.Fatal(err)
	}
	m := hmac.New(sha256.New, key)
	m.Write(msg)
	if !hmac.Equal(got, m.Sum(nil)) {
		t.Fatalf("TPM HMAC %x differs from DPS's %x", got, m.Sum(nil))
	}
	noLeaks(t, s)

	t.Run("fail/another TPM", func(t *testing.T) {
		other := openStore(t)
		oek, osrk, err := other.DPSPublics(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if string(oek) == string(ek) {
			t.Fatal("two swtpms have the same EK")
		}
		for name, pair := range map[string][2][]byte{"other EK": {oek, srk}, "other SRK": {ek, osrk}} {
			blob, _, err := dps.TPMChallenge(pair[0], pair[1])
			if err != nil {
				t.Fatal(err)
			}
			_, err = s.DPSSign(ctx, blob, msg)
			if !errors.Is(err, ErrChallenge) {
				t.Errorf("%s: got %v, want ErrChallenge", name, err)
			}
			// libtpms answers a seed it cannot decrypt with TPM_RC_FAILURE;
			// the TPM must still work afterwards.
			if _, err := s.DPSSign(ctx, blob0, msg); err != nil {
				t.Fatalf("after a refused challenge the TPM no longer works: %v", err)
			}
		}
		noLeaks(t, s)
	})
	t.Run("fail/corrupted", func(t *testing.T) {
		// Flip one byte in each of the five parts, and truncate.
		offsets := []int{10, 100, 400, 700, len(blob) - 20}
		for _, off := range offsets {
			bad := append([]byte(nil), blob...)
			bad[off] ^= 0x55
			if _, err := s.DPSSign(ctx, bad, msg); err == nil {
				t.Errorf("byte %d flipped: accepted", off)
			}
		}
		for _, n := range []int{0, 1, 50, len(blob) / 2} {
			if _, err := s.DPSSign(ctx, blob[:n], msg); !errors.Is(err, ErrChallenge) {
				t.Errorf("truncated to %d: got %v, want ErrChallenge", n, err)
			}
		}
		noLeaks(t, s)
	})
}

func TestEndorsement(t *testing.T) {
	ctx := context.Background()
	t.Run("ok/no certificate", func(t *testing.T) {
		s := openStore(t)
		e, err := s.Endorsement(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ek, _, _ := s.DPSPublics(ctx)
		if string(e.Public) != string(ek) || e.Cert != nil || e.Persistent {
			t.Fatalf("endorsement %+v", e)
		}
		noLeaks(t, s)
	})
	t.Run("ok/certificate in NV", func(t *testing.T) {
		s := openStore(t)
		der := selfSigned(t)
		writeNV(t, s, ekCertIndex, append(der, make([]byte, 600)...)) // padded, as vendors do; read in two parts
		e, err := s.Endorsement(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if e.Cert == nil || string(e.Cert.Raw) != string(der) {
			t.Fatalf("EK certificate not read back: %v", e.Cert)
		}
	})
	t.Run("ok/persisted EK", func(t *testing.T) {
		s := openStore(t)
		want, _, _ := s.DPSPublics(ctx)
		persist(t, s, tpm.TPMRHEndorsement, tpm.RSAEKTemplate, ekPersistent)
		e, err := s.Endorsement(ctx)
		if err != nil || !e.Persistent || string(e.Public) != string(want) {
			t.Fatalf("persisted EK: %+v, %v", e, err)
		}
		// The challenge works with the persisted EK too.
		ek, srk, _ := s.DPSPublics(ctx)
		blob, _, _ := dps.TPMChallenge(ek, srk)
		if _, err := s.DPSSign(ctx, blob, []byte("x")); err != nil {
			t.Fatal(err)
		}
		noLeaks(t, s)
	})
	t.Run("ok/persisted RSA SRK is used and kept", func(t *testing.T) {
		s := openStore(t)
		persist(t, s, tpm.TPMRHOwner, tpm.RSASRKTemplate, srkHandle)
		rp, err := (tpm.ReadPublic{ObjectHandle: srkHandle}).Execute(s.tpm)
		if err != nil {
			t.Fatal(err)
		}
		ek, srk, err := s.DPSPublics(ctx)
		if err != nil || string(srk) != string(tpm.Marshal(rp.OutPublic)) {
			t.Fatalf("the SRK sent is not the persisted one (%v)", err)
		}
		blob, _, _ := dps.TPMChallenge(ek, srk)
		if _, err := s.DPSSign(ctx, blob, []byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, err := (tpm.ReadPublic{ObjectHandle: srkHandle}).Execute(s.tpm); err != nil {
			t.Fatal("the persisted SRK is gone")
		}
		noLeaks(t, s)
	})
	t.Run("fail/unsupported EK template", func(t *testing.T) {
		s := openStore(t)
		persist(t, s, tpm.TPMRHEndorsement, tpm.ECCEKTemplate, ekPersistent)
		_, err := s.Endorsement(ctx)
		if !errors.Is(err, ErrEKTemplate) {
			t.Fatalf("got %v, want ErrEKTemplate", err)
		}
		if _, _, err := s.DPSPublics(ctx); !errors.Is(err, ErrEKTemplate) {
			t.Fatalf("DPSPublics: got %v", err)
		}
	})
	t.Run("fail/endorsement password", func(t *testing.T) {
		s := openStore(t)
		if _, err := (tpm.HierarchyChangeAuth{AuthHandle: tpm.TPMRHEndorsement, NewAuth: tpm.TPM2BAuth{Buffer: []byte("secret-pw")}}).Execute(s.tpm); err != nil {
			t.Fatal(err)
		}
		_, err := s.Endorsement(ctx)
		if !errors.Is(err, ErrEndorsementAuth) {
			t.Fatalf("got %v, want ErrEndorsementAuth", err)
		}
		if strings.Contains(err.Error(), "secret-pw") {
			t.Fatal("error repeats the password")
		}
		noLeaks(t, s)
	})
	t.Run("fail/no EK", func(t *testing.T) {
		s := openStore(t)
		disableEndorsement(t, s)
		_, err := s.Endorsement(ctx)
		if !errors.Is(err, ErrNoEK) {
			t.Fatalf("got %v, want ErrNoEK", err)
		}
	})
}

func persist(t *testing.T, s *Store, hier tpm.TPMHandle, tmpl tpm.TPMTPublic, h tpm.TPMHandle) {
	t.Helper()
	rsp, err := tpm.CreatePrimary{PrimaryHandle: hier, InPublic: tpm.New2B(tmpl)}.Execute(s.tpm)
	if err != nil {
		t.Fatal(err)
	}
	defer s.flush(rsp.ObjectHandle)
	if _, err := (tpm.EvictControl{Auth: tpm.TPMRHOwner, ObjectHandle: &tpm.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name},
		PersistentHandle: h}).Execute(s.tpm); err != nil {
		t.Fatal(err)
	}
}

func writeNV(t *testing.T, s *Store, idx tpm.TPMHandle, data []byte) {
	t.Helper()
	def := tpm.NVDefineSpace{
		AuthHandle: tpm.TPMRHOwner,
		PublicInfo: tpm.New2B(tpm.TPMSNVPublic{
			NVIndex: idx, NameAlg: tpm.TPMAlgSHA256,
			Attributes: tpm.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, AuthWrite: true, NoDA: true},
			DataSize:   uint16(len(data)),
		}),
	}
	if _, err := def.Execute(s.tpm); err != nil {
		t.Fatal(err)
	}
	rp, err := (tpm.NVReadPublic{NVIndex: idx}).Execute(s.tpm)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += 512 {
		end := min(off+512, len(data))
		if _, err := (tpm.NVWrite{AuthHandle: tpm.TPMRHOwner, NVIndex: tpm.NamedHandle{Handle: idx, Name: rp.NVName},
			Data: tpm.TPM2BMaxNVBuffer{Buffer: data[off:end]}, Offset: uint16(off)}).Execute(s.tpm); err != nil {
			t.Fatal(err)
		}
	}
}

// disableEndorsement runs TPM2_HierarchyControl(platform, endorsement, NO),
// which go-tpm has no struct for, as raw bytes.
func disableEndorsement(t *testing.T, s *Store) {
	t.Helper()
	cmd := []byte{
		0x80, 0x02, 0, 0, 0, 0, // TPM_ST_SESSIONS, size (filled below)
		0, 0, 0x01, 0x21, // TPM_CC_HierarchyControl
		0x40, 0, 0, 0x0C, // authHandle TPM_RH_PLATFORM
		0, 0, 0, 9, // authorization size
		0x40, 0, 0, 0x09, 0, 0, 0x01, 0, 0, // TPM_RS_PW, empty nonce, continueSession, empty password
		0x40, 0, 0, 0x0B, // enable = TPM_RH_ENDORSEMENT
		0, // state = NO
	}
	cmd[5] = byte(len(cmd))
	rsp, err := s.tpm.Send(cmd)
	if err != nil {
		t.Fatal(err)
	}
	if len(rsp) < 10 || rsp[6] != 0 || rsp[7] != 0 || rsp[8] != 0 || rsp[9] != 0 {
		t.Fatalf("HierarchyControl failed: %x", rsp)
	}
}

func selfSigned(t *testing.T) []byte {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "EK test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// countCC counts the commands of one code sent through a transport.
type countCC struct {
	transport.TPMCloser
	cc tpm.TPMCC
	n  int
}

func (c *countCC) Send(cmd []byte) ([]byte, error) {
	if len(cmd) >= 10 && tpm.TPMCC(binary.BigEndian.Uint32(cmd[6:10])) == c.cc {
		c.n++
	}
	return c.TPMCloser.Send(cmd)
}

// The RSA EK and SRK are derived once per store: the challenge reloads
// their saved contexts instead of deriving them again.
func TestPrimariesDerivedOnce(t *testing.T) {
	ctx := context.Background()
	sw := testenv.StartSWTPM(t)
	tr, err := linuxudstpm.Open(sw.Sock)
	if err != nil {
		t.Fatal(err)
	}
	c := &countCC{TPMCloser: tr, cc: tpm.TPMCCCreatePrimary}
	s, err := New(c, sw.Sock)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ek, srk, err := s.DPSPublics(ctx)
	if err != nil || c.n != 2 {
		t.Fatalf("DPSPublics: %d CreatePrimary, err %v", c.n, err)
	}
	for range 2 {
		blob, _, _ := dps.TPMChallenge(ek, srk)
		if _, err := s.DPSSign(ctx, blob, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Endorsement(ctx); err != nil {
		t.Fatal(err)
	}
	if c.n != 2 {
		t.Fatalf("%d CreatePrimary in all; the EK and SRK should be derived once", c.n)
	}
	noLeaks(t, s)
}
