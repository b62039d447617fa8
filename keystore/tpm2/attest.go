package tpm2

// TPM attestation for Azure DPS: the endorsement key (EK) as the onboarding
// credential. DPS knows the EK's public area from an individual enrollment;
// it answers the first registration with a challenge only this TPM can
// open, and the device proves possession by signing a SAS token with the
// HMAC key inside the challenge:
//
//  1. TPM2_ActivateCredential with the EK (authorized by the EK's policy,
//     PolicySecret(TPM_RH_ENDORSEMENT)) releases the inner wrapper key that
//     DPS protected against the EK for the SRK's name (TPM2_MakeCredential).
//  2. TPM2_Import under the SRK turns DPS's duplication blob (inner wrapper:
//     AES-128-CFB with that key; outer wrapper: a seed encrypted to the SRK)
//     into a TPM-wrapped private area; TPM2_Load loads it.
//  3. TPM2_HMAC signs the token with the loaded key.
//
// The HMAC key never exists outside the TPM, and nothing is stored: every
// object and session is flushed before the call returns, on success and on
// error. The EK and SRK are the TCG reference RSA-2048 templates DPS uses
// (the Azure IoT C SDK's hsm_client_tpm creates the same ones); persisted
// copies at 0x81010001 and 0x81000001 are used when present, else they are
// derived once per Store and reloaded from TPM-encrypted saved contexts.
//
// go-tpm-tools' client package has the EK templates and NV helpers too, but
// it adds about 1.9 MB (+27 %) to the CGO-free arm64 binary; the templates
// are in go-tpm already and the NV certificate read is a few lines.

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"

	tpm "github.com/google/go-tpm/tpm2"

	"github.com/gwagent/gwagent/keystore"
)

// Handles and NV indices of the TCG EK Credential Profile and the TCG
// provisioning guidance.
const (
	ekPersistent  = tpm.TPMHandle(0x81010001) // RSA 2048 EK
	ekCertIndex   = tpm.TPMHandle(0x01C00002) // RSA 2048 EK certificate
	maxEKCertSize = 4096
)

// Errors of TPM attestation.
var (
	// ErrNoEK: the TPM has no endorsement key and cannot make one.
	ErrNoEK = errors.New("no endorsement key")
	// ErrEKTemplate: the TPM's EK is not the RSA 2048 EK DPS uses, or the
	// TPM cannot create it.
	ErrEKTemplate = errors.New("unsupported endorsement key")
	// ErrEndorsementAuth: the endorsement hierarchy has a password.
	ErrEndorsementAuth = errors.New("endorsement hierarchy is password-protected")
	// ErrChallenge: DPS's challenge cannot be opened by this TPM: it was made
	// for another TPM's EK or SRK, or it is damaged. Retrying cannot help.
	ErrChallenge = errors.New("TPM attestation challenge refused by the TPM")
)

// Endorsement is what a manufacturer records in a DPS individual enrollment.
type Endorsement struct {
	// Public is the EK's TPM2B_PUBLIC as DPS wants it (base64 it).
	Public []byte
	// Cert is the EK certificate (DER) from NV index 0x01C00002, or nil
	// when the TPM has none.
	Cert *x509.Certificate
	// Persistent reports whether the EK is persisted at 0x81010001 (else it
	// is recreated from the endorsement seed, which yields the same key).
	Persistent bool
}

// Endorsement reads the RSA EK's public area and its certificate.
func (s *Store) Endorsement(ctx context.Context) (*Endorsement, error) {
	var out Endorsement
	err := s.locked(func() error {
		ek, release, persistent, err := s.ek()
		if err != nil {
			return err
		}
		release()
		out.Public, out.Persistent = tpm.Marshal(ek.pub), persistent
		out.Cert, err = s.ekCert()
		return err
	})
	if err != nil {
		return nil, err
	}
	return &out, nil
}

// DPSPublics returns the EK and SRK public areas (TPM2B_PUBLIC) the first
// TPM registration request carries.
func (s *Store) DPSPublics(ctx context.Context) (ek, srk []byte, err error) {
	err = s.locked(func() error {
		e, releaseEK, _, err := s.ek()
		if err != nil {
			return err
		}
		releaseEK()
		r, releaseSRK, err := s.rsaSRK()
		if err != nil {
			return err
		}
		releaseSRK()
		ek, srk = tpm.Marshal(e.pub), tpm.Marshal(r.pub)
		return nil
	})
	return ek, srk, err
}

// DPSSign opens DPS's challenge (the base64-decoded authenticationKey) in
// the TPM and returns HMAC-SHA256(key, data) computed by the TPM with the
// key the challenge carries.
func (s *Store) DPSSign(ctx context.Context, challenge, data []byte) ([]byte, error) {
	ch, err := parseChallenge(challenge)
	if err != nil {
		return nil, err
	}
	if len(data) > 1024 {
		return nil, fmt.Errorf("tpm2 dps sign: %d bytes is more than TPM2_HMAC takes", len(data))
	}
	var mac []byte
	err = s.locked(func() error {
		srk, releaseSRK, err := s.rsaSRK()
		if err != nil {
			return err
		}
		defer releaseSRK()
		ek, releaseEK, _, err := s.ek()
		if err != nil {
			return err
		}
		inner, err := s.activate(ek, srk, ch.idObject, ch.secret)
		releaseEK()
		if err != nil {
			return err
		}
		imp, err := tpm.Import{
			ParentHandle:  tpm.AuthHandle{Handle: srk.handle, Name: srk.name, Auth: tpm.PasswordAuth(nil)},
			EncryptionKey: tpm.TPM2BData{Buffer: inner},
			ObjectPublic:  ch.public,
			Duplicate:     ch.duplicate,
			InSymSeed:     ch.seed,
			Symmetric: tpm.TPMTSymDef{
				Algorithm: tpm.TPMAlgAES,
				KeyBits:   tpm.NewTPMUSymKeyBits(tpm.TPMAlgAES, tpm.TPMKeyBits(128)),
				Mode:      tpm.NewTPMUSymMode(tpm.TPMAlgAES, tpm.TPMAlgCFB),
			},
		}.Execute(s.tpm)
		if errors.Is(err, keystore.ErrDeviceAbsent) {
			return fmt.Errorf("tpm2 dps sign: importing the key: %w", err)
		}
		if err != nil {
			return fmt.Errorf("tpm2 dps sign: %w: importing the key under the storage root key failed (%v); the challenge was made for another SRK or is damaged", ErrChallenge, err)
		}
		ld, err := tpm.Load{
			ParentHandle: tpm.AuthHandle{Handle: srk.handle, Name: srk.name, Auth: tpm.PasswordAuth(nil)},
			InPrivate:    imp.OutPrivate,
			InPublic:     ch.public,
		}.Execute(s.tpm)
		if errors.Is(err, keystore.ErrDeviceAbsent) {
			return fmt.Errorf("tpm2 dps sign: loading the imported key: %w", err)
		}
		if err != nil {
			return fmt.Errorf("tpm2 dps sign: %w: loading the imported key failed (%v)", ErrChallenge, err)
		}
		defer s.flush(ld.ObjectHandle)
		rsp, err := tpm.Hmac{
			Handle:  tpm.AuthHandle{Handle: ld.ObjectHandle, Name: ld.Name, Auth: tpm.PasswordAuth(nil)},
			Buffer:  tpm.TPM2BMaxBuffer{Buffer: data},
			HashAlg: tpm.TPMAlgSHA256,
		}.Execute(s.tpm)
		if err != nil {
			return fmt.Errorf("tpm2 dps sign: TPM2_HMAC: %w", s.lockout(err))
		}
		mac = rsp.OutHMAC.Buffer
		return nil
	})
	return mac, err
}

// loaded is a primary key in a transient (or persistent) handle.
type loaded struct {
	handle tpm.TPMHandle
	name   tpm.TPM2BName
	pub    *tpm.TPM2BPublic
}

// ek returns the RSA EK: the persisted one if there is one (checked to be
// the reference template), else one created from the endorsement seed.
func (s *Store) ek() (loaded, func(), bool, error) {
	rp, err := (tpm.ReadPublic{ObjectHandle: ekPersistent}).Execute(s.tpm)
	if errors.Is(err, keystore.ErrDeviceAbsent) {
		return loaded{}, nil, false, fmt.Errorf("tpm2: reading the EK: %w", err)
	}
	if err == nil {
		if err := checkEK(&rp.OutPublic); err != nil {
			return loaded{}, nil, true, err
		}
		return loaded{handle: ekPersistent, name: rp.Name, pub: &rp.OutPublic}, func() {}, true, nil
	}
	if l, release, ok := s.loadSaved(tpm.TPMRHEndorsement); ok {
		return l, release, false, nil
	}
	rsp, err := tpm.CreatePrimary{PrimaryHandle: tpm.TPMRHEndorsement, InPublic: tpm.New2B(tpm.RSAEKTemplate)}.Execute(s.tpm)
	switch {
	case err == nil:
	case errors.Is(err, tpm.TPMRCBadAuth), errors.Is(err, tpm.TPMRCAuthFail):
		return loaded{}, nil, false, fmt.Errorf("tpm2: %w: creating the EK needs the endorsement hierarchy's authorization, which is not empty on %s; clear it with `tpm2_changeauth -c e -p OLD` (DPS attestation, like the Azure SDKs, expects it empty)", ErrEndorsementAuth, s.name)
	case errors.Is(err, tpm.TPMRCHierarchy):
		return loaded{}, nil, false, fmt.Errorf("tpm2: %w on %s: the endorsement hierarchy is disabled and no EK is persisted at 0x81010001; enable the endorsement hierarchy in firmware or persist the EK at provisioning time", ErrNoEK, s.name)
	default:
		var f1 tpm.TPMFmt1Error
		if errors.As(err, &f1) {
			return loaded{}, nil, false, fmt.Errorf("tpm2: %w: %s cannot create the RSA 2048 EK (TCG template L-1) that DPS attestation uses: %v; use X.509 or symmetric-key onboarding on this device", ErrEKTemplate, s.name, err)
		}
		return loaded{}, nil, false, fmt.Errorf("tpm2: creating the EK: %w", err)
	}
	h := rsp.ObjectHandle
	l := loaded{handle: h, name: rsp.Name, pub: &rsp.OutPublic}
	s.save(tpm.TPMRHEndorsement, l)
	return l, func() { s.flush(h) }, false, nil
}

// checkEK accepts a persisted EK only if it is an RSA 2048 restricted
// decryption key whose use is governed by the standard EK policy: that is
// what DPS's challenge and our policy session assume.
func checkEK(p *tpm.TPM2BPublic) error {
	pub, err := p.Contents()
	if err != nil {
		return fmt.Errorf("tpm2: %w: the object at 0x81010001 has an unreadable public area: %v", ErrEKTemplate, err)
	}
	want := tpm.RSAEKTemplate
	if pub.Type != tpm.TPMAlgRSA {
		return fmt.Errorf("tpm2: %w: the EK persisted at 0x81010001 is not an RSA key (algorithm 0x%04x); DPS attestation uses the RSA 2048 EK: evict it and let gwagent create the standard one, or use X.509 onboarding", ErrEKTemplate, uint16(pub.Type))
	}
	rsa, err := pub.Parameters.RSADetail()
	if err != nil || rsa.KeyBits != 2048 || !pub.ObjectAttributes.Restricted || !pub.ObjectAttributes.Decrypt ||
		pub.ObjectAttributes.SignEncrypt || pub.NameAlg != want.NameAlg || !bytes.Equal(pub.AuthPolicy.Buffer, want.AuthPolicy.Buffer) {
		return fmt.Errorf("tpm2: %w: the key persisted at 0x81010001 is not an RSA 2048 EK made from the TCG template (restricted decryption key with the standard EK policy)", ErrEKTemplate)
	}
	return nil
}

// rsaSRK returns the RSA 2048 storage root key DPS duplicates the HMAC key
// to: the persisted 0x81000001 if it is an RSA storage key, else the TCG
// reference SRK created from the owner seed.
func (s *Store) rsaSRK() (loaded, func(), error) {
	rp, err := (tpm.ReadPublic{ObjectHandle: srkHandle}).Execute(s.tpm)
	if errors.Is(err, keystore.ErrDeviceAbsent) {
		return loaded{}, nil, fmt.Errorf("tpm2: reading the storage root key: %w", err)
	}
	if err == nil {
		if pub, err := rp.OutPublic.Contents(); err == nil && pub.Type == tpm.TPMAlgRSA &&
			pub.ObjectAttributes.Restricted && pub.ObjectAttributes.Decrypt && pub.ObjectAttributes.UserWithAuth {
			return loaded{handle: srkHandle, name: rp.Name, pub: &rp.OutPublic}, func() {}, nil
		}
	}
	if l, release, ok := s.loadSaved(tpm.TPMRHOwner); ok {
		return l, release, nil
	}
	rsp, err := tpm.CreatePrimary{PrimaryHandle: tpm.TPMRHOwner, InPublic: tpm.New2B(tpm.RSASRKTemplate)}.Execute(s.tpm)
	if errors.Is(err, keystore.ErrDeviceAbsent) {
		return loaded{}, nil, fmt.Errorf("tpm2: creating the RSA storage root key: %w", err)
	}
	if err != nil {
		return loaded{}, nil, fmt.Errorf("tpm2: creating the RSA storage root key: %w (is the owner hierarchy password-protected?)", err)
	}
	h := rsp.ObjectHandle
	l := loaded{handle: h, name: rsp.Name, pub: &rsp.OutPublic}
	s.save(tpm.TPMRHOwner, l)
	return l, func() { s.flush(h) }, nil
}

// savedPrimary is a context-saved RSA primary key. Deriving an RSA 2048
// primary takes the TPM hundreds of milliseconds (seconds on some discrete
// TPMs), and a registration needs the EK and SRK twice (public areas, then
// the challenge); a saved context reloads in a millisecond and occupies no
// object slot in between. It is tied to this TPM's current power cycle: a
// context that no longer loads is dropped and the key derived again.
type savedPrimary struct {
	ctx  []byte // TPMS_CONTEXT as TPM2_ContextSave returned it
	name tpm.TPM2BName
	pub  tpm.TPM2BPublic
}

// TPM2_ContextSave, TPM2_ContextLoad, TPM2_NV_ReadPublic and TPM2_NV_Read
// (TPM 2.0 Part 3, 28.2, 28.3, 31.6 and 31.13) go to the TPM as bytes built
// here rather than through go-tpm's command structs: go-tpm compiles its
// generic command code once for each response type, about 16 KiB of the
// stripped arm64 binary per command, and these four need no more than a
// password session and a few fields of their answers.
const (
	ccNVRead       = 0x0000014E
	ccContextLoad  = 0x00000161
	ccContextSave  = 0x00000162
	ccNVReadPublic = 0x00000169
)

// save keeps a context of a freshly created primary (best effort).
func (s *Store) save(hier tpm.TPMHandle, l loaded) {
	ctx, err := s.command(ccContextSave, []uint32{uint32(l.handle)}, false, nil)
	if err != nil || len(ctx) < 8+4+4+2 { // sequence, savedHandle, hierarchy, contextBlob's size
		return
	}
	if s.saved == nil {
		s.saved = map[tpm.TPMHandle]*savedPrimary{}
	}
	s.saved[hier] = &savedPrimary{ctx: ctx, name: l.name, pub: *l.pub}
}

// loadSaved reloads the saved primary of hier, if there is one that loads.
func (s *Store) loadSaved(hier tpm.TPMHandle) (loaded, func(), bool) {
	sp := s.saved[hier]
	if sp == nil {
		return loaded{}, nil, false
	}
	rsp, err := s.command(ccContextLoad, nil, false, sp.ctx)
	if err != nil || len(rsp) != 4 {
		delete(s.saved, hier)
		return loaded{}, nil, false
	}
	h := tpm.TPMHandle(binary.BigEndian.Uint32(rsp))
	pub := sp.pub
	return loaded{handle: h, name: sp.name, pub: &pub}, func() { s.flush(h) }, true
}

// command sends the TPM a command: its handles, then, if password, an
// authorization area with one password session and the empty password (for
// the first handle), then its parameters. It returns the response after its
// header (and, with the session, after its parameter size): the response's
// handles, then its parameters; the session's answer is not returned.
func (s *Store) command(cc uint32, handles []uint32, password bool, params []byte) ([]byte, error) {
	const header = 2 + 4 + 4 // tag, size, command or response code
	tag := tpm.TPMSTNoSessions
	if password {
		tag = tpm.TPMSTSessions
	}
	cmd := binary.BigEndian.AppendUint16(make([]byte, 0, 64+len(params)), uint16(tag))
	cmd = binary.BigEndian.AppendUint32(cmd, 0) // size, below
	cmd = binary.BigEndian.AppendUint32(cmd, cc)
	for _, h := range handles {
		cmd = binary.BigEndian.AppendUint32(cmd, h)
	}
	if password {
		cmd = binary.BigEndian.AppendUint32(cmd, 4+2+1+2)             // the authorization area's size
		cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm.TPMRSPW)) // session handle
		cmd = append(cmd, 0, 0, 0, 0, 0)                              // empty nonce, no attributes, empty password
	}
	cmd = append(cmd, params...)
	binary.BigEndian.PutUint32(cmd[2:], uint32(len(cmd)))
	rsp, err := s.tpm.Send(cmd)
	if err != nil {
		return nil, err
	}
	if len(rsp) < header || int(binary.BigEndian.Uint32(rsp[2:])) != len(rsp) {
		return nil, fmt.Errorf("tpm2: a malformed response to command 0x%x", cc)
	}
	if rc := tpm.TPMRC(binary.BigEndian.Uint32(rsp[6:])); rc != tpm.TPMRCSuccess {
		return nil, rc
	}
	rsp = rsp[header:]
	if password { // no response handles for the commands sent with one
		if len(rsp) < 4 || binary.BigEndian.Uint32(rsp) > uint32(len(rsp)-4) {
			return nil, fmt.Errorf("tpm2: a malformed response to command 0x%x", cc)
		}
		rsp = rsp[4 : 4+binary.BigEndian.Uint32(rsp)]
	}
	return rsp, nil
}

// sized returns a TPM2B's contents from the start of b and what follows.
func sized(b []byte) (contents, rest []byte, ok bool) {
	if len(b) < 2 || int(binary.BigEndian.Uint16(b)) > len(b)-2 {
		return nil, nil, false
	}
	n := 2 + int(binary.BigEndian.Uint16(b))
	return b[2:n], b[n:], true
}

// activate runs TPM2_ActivateCredential for the SRK's name with the EK,
// authorized by the EK policy (PolicySecret on the endorsement hierarchy)
// in a policy session that is flushed before returning.
func (s *Store) activate(ek, srk loaded, blob, secret []byte) ([]byte, error) {
	sess, closeSess, err := tpm.PolicySession(s.tpm, tpm.TPMAlgSHA256, 16)
	if err != nil {
		return nil, fmt.Errorf("tpm2 dps sign: starting the EK policy session: %w", err)
	}
	defer closeSess()
	if _, err := (tpm.PolicySecret{AuthHandle: tpm.TPMRHEndorsement, PolicySession: sess.Handle()}).Execute(s.tpm); err != nil {
		if errors.Is(err, tpm.TPMRCBadAuth) || errors.Is(err, tpm.TPMRCAuthFail) {
			return nil, fmt.Errorf("tpm2 dps sign: %w: the EK policy needs the endorsement hierarchy's authorization, which is not empty on %s", ErrEndorsementAuth, s.name)
		}
		return nil, fmt.Errorf("tpm2 dps sign: EK policy: %w", err)
	}
	rsp, err := tpm.ActivateCredential{
		ActivateHandle: tpm.NamedHandle{Handle: srk.handle, Name: srk.name},
		KeyHandle:      tpm.AuthHandle{Handle: ek.handle, Name: ek.name, Auth: sess},
		CredentialBlob: tpm.TPM2BIDObject{Buffer: blob},
		Secret:         tpm.TPM2BEncryptedSecret{Buffer: secret},
	}.Execute(s.tpm)
	if errors.Is(err, keystore.ErrDeviceAbsent) {
		return nil, fmt.Errorf("tpm2 dps sign: TPM2_ActivateCredential: %w", err)
	}
	if err != nil {
		why := "it was made for another TPM's endorsement key, or it is damaged"
		if errors.Is(err, tpm.TPMRCIntegrity) {
			why = "its integrity check failed: it is damaged, or made for another storage root key"
		}
		return nil, fmt.Errorf("tpm2 dps sign: %w: TPM2_ActivateCredential failed (%v): %s", ErrChallenge, err, why)
	}
	return rsp.CertInfo.Buffer, nil
}

// challenge is DPS's authenticationKey: TPM2B_ID_OBJECT (credential blob),
// TPM2B_ENCRYPTED_SECRET (its seed, encrypted to the EK), TPM2B_PRIVATE
// (the duplicated HMAC key), TPM2B_ENCRYPTED_SECRET (the duplication seed,
// encrypted to the SRK), TPM2B_PUBLIC (the HMAC key's public area),
// optionally followed by a sized encrypted-data field gwagent ignores.
type challenge struct {
	idObject, secret []byte
	duplicate        tpm.TPM2BPrivate
	seed             tpm.TPM2BEncryptedSecret
	public           tpm.TPM2BPublic
}

func parseChallenge(b []byte) (*challenge, error) {
	var parts [5][]byte
	rest := b
	for i := range parts {
		if len(rest) < 2 {
			return nil, fmt.Errorf("tpm2 dps sign: %w: the challenge is truncated (%d bytes, part %d of 5 missing)", ErrChallenge, len(b), i+1)
		}
		n := int(binary.BigEndian.Uint16(rest))
		if n == 0 || len(rest) < 2+n {
			return nil, fmt.Errorf("tpm2 dps sign: %w: the challenge is malformed (part %d of 5 has a bad size)", ErrChallenge, i+1)
		}
		parts[i], rest = rest[2:2+n], rest[2+n:]
	}
	pub, err := tpm.Unmarshal[tpm.TPM2BPublic](append(binary.BigEndian.AppendUint16(nil, uint16(len(parts[4]))), parts[4]...))
	if err != nil {
		return nil, fmt.Errorf("tpm2 dps sign: %w: the key's public area is malformed: %v", ErrChallenge, err)
	}
	c, err := pub.Contents()
	if err != nil || c.Type != tpm.TPMAlgKeyedHash || c.ObjectAttributes.Decrypt || !c.ObjectAttributes.SignEncrypt ||
		c.ObjectAttributes.FixedTPM || c.ObjectAttributes.FixedParent {
		return nil, fmt.Errorf("tpm2 dps sign: %w: the challenge does not carry an HMAC key", ErrChallenge)
	}
	return &challenge{
		idObject:  parts[0],
		secret:    parts[1],
		duplicate: tpm.TPM2BPrivate{Buffer: parts[2]},
		seed:      tpm.TPM2BEncryptedSecret{Buffer: parts[3]},
		public:    *pub,
	}, nil
}

// ekCert reads the RSA EK certificate from NV, or returns nil if the TPM
// has none. A present but unparsable certificate is an error.
func (s *Store) ekCert() (*x509.Certificate, error) {
	rp, err := s.command(ccNVReadPublic, []uint32{uint32(ekCertIndex)}, false, nil)
	if errors.Is(err, keystore.ErrDeviceAbsent) {
		return nil, fmt.Errorf("tpm2: reading the EK certificate: %w", err)
	}
	if err != nil {
		return nil, nil // no certificate provisioned: common on boards and swtpm
	}
	// TPMS_NV_PUBLIC: nvIndex, nameAlg, attributes, authPolicy, dataSize.
	nv, _, ok := sized(rp)
	if ok && len(nv) >= 4+2+4 {
		_, nv, ok = sized(nv[4+2+4:]) // what follows authPolicy
	}
	if !ok || len(nv) < 2 {
		return nil, fmt.Errorf("tpm2: the EK certificate index's public area is malformed")
	}
	size := int(binary.BigEndian.Uint16(nv))
	if size == 0 || size > maxEKCertSize {
		return nil, fmt.Errorf("tpm2: the EK certificate index holds %d bytes; that is not a certificate", size)
	}
	var der []byte
	for off := 0; off < size; {
		n := min(size-off, 512) // below every TPM's MAX_NV_BUFFER_SIZE
		// The index authorizes its own read, with the empty password.
		params := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, uint16(n)), uint16(off))
		rsp, err := s.command(ccNVRead, []uint32{uint32(ekCertIndex), uint32(ekCertIndex)}, true, params)
		if err != nil {
			return nil, fmt.Errorf("tpm2: reading the EK certificate: %w", err)
		}
		data, _, ok := sized(rsp)
		if !ok || len(data) != n {
			return nil, fmt.Errorf("tpm2: reading the EK certificate: the TPM returned %d bytes of %d", len(data), n)
		}
		der = append(der, data...)
		off += n
	}
	// Certificates in NV are often padded to the index size.
	c, err := x509.ParseCertificate(trimDER(der))
	if err != nil {
		return nil, fmt.Errorf("tpm2: the EK certificate in NV is not X.509: %w", err)
	}
	return c, nil
}

// trimDER cuts a DER SEQUENCE to its encoded length (NV padding after it).
func trimDER(b []byte) []byte {
	if len(b) < 4 || b[0] != 0x30 {
		return b
	}
	var n, hdr int
	switch l := b[1]; {
	case l < 0x80:
		n, hdr = int(l), 2
	case l == 0x81:
		n, hdr = int(b[2]), 3
	case l == 0x82:
		n, hdr = int(b[2])<<8|int(b[3]), 4
	default:
		return b
	}
	if hdr+n <= len(b) {
		return b[:hdr+n]
	}
	return b
}
