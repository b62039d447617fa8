package dps

// DPS's side of TPM attestation, written from the TPM 2.0 specification
// (Part 1: 24 "Credential Protection", 23.3 "Duplication", 11.4.10 KDFa;
// Part 2: TPMT_PUBLIC, TPMT_SENSITIVE) and the layout of the challenge the
// Azure IoT C SDK unmarshals. It deliberately shares no code with gwagent's
// TPM client, so a misreading on one side shows up as a failing test.

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
)

// TPM constants used here (Part 2).
const (
	algRSA       = 0x0001
	algKeyedHash = 0x0008
	algSHA256    = 0x000B
	algNull      = 0x0010
	algAES       = 0x0006
	algCFB       = 0x0043
	algHMAC      = 0x0005

	attrFixedTPM            = 1 << 1
	attrFixedParent         = 1 << 4
	attrSensitiveDataOrigin = 1 << 5
	attrUserWithAuth        = 1 << 6
	attrRestricted          = 1 << 16
	attrDecrypt             = 1 << 17
	attrSign                = 1 << 18
)

// tpmRSAKey is the part of an RSA TPMT_PUBLIC (EK or SRK) the challenge
// needs: its public key, its Name and its symmetric algorithm's key size.
type tpmRSAKey struct {
	pub     *rsa.PublicKey
	name    []byte // nameAlg || H(TPMT_PUBLIC)
	symBits int    // 128 or 256 (AES-CFB)
	attrs   uint32
}

// parseRSAPublic reads a TPM2B_PUBLIC of a restricted RSA decryption key
// with SHA-256 as its name algorithm and AES-CFB as its symmetric
// algorithm: the shape of the TCG EK and SRK templates.
func parseRSAPublic(b []byte) (*tpmRSAKey, error) {
	r := tpmReader{b: b}
	area := r.sized()
	if r.err != nil || len(r.b) != 0 {
		return nil, errors.New("not a TPM2B_PUBLIC")
	}
	p := tpmReader{b: area}
	typ, nameAlg, attrs := p.u16(), p.u16(), p.u32()
	p.sized() // authPolicy
	if typ != algRSA || nameAlg != algSHA256 {
		return nil, fmt.Errorf("key type 0x%04x / name algorithm 0x%04x: want an RSA key named with SHA-256", typ, nameAlg)
	}
	k := &tpmRSAKey{attrs: attrs}
	if symAlg := p.u16(); symAlg == algAES {
		// The key size feeds KDFa and AES directly: anything but an AES
		// key size would make the challenge fail (or worse) later.
		if k.symBits = int(p.u16()); k.symBits != 128 && k.symBits != 192 && k.symBits != 256 {
			return nil, fmt.Errorf("AES-%d: want AES-128, AES-192 or AES-256", k.symBits)
		}
		if mode := p.u16(); mode != algCFB {
			return nil, fmt.Errorf("symmetric mode 0x%04x: want CFB", mode)
		}
	} else {
		return nil, errors.New("the key has no AES symmetric algorithm; it is not a storage or endorsement key")
	}
	if scheme := p.u16(); scheme != algNull {
		p.u16()
	}
	bits, exp := p.u16(), p.u32()
	mod := p.sized()
	if p.err != nil || len(p.b) != 0 {
		return nil, errors.New("malformed RSA public area")
	}
	if bits != 2048 || len(mod) != 256 {
		return nil, fmt.Errorf("RSA %d: want RSA 2048", bits)
	}
	if attrs&(attrRestricted|attrDecrypt) != attrRestricted|attrDecrypt {
		return nil, errors.New("not a restricted decryption key")
	}
	if exp == 0 {
		exp = 65537 // the TPM's default exponent
	}
	// What RSA-OAEP needs of the key, checked here so that a bad key is
	// the client's 400 rather than DPS's 500 when the challenge is made.
	if exp < 3 || exp%2 == 0 || exp > 1<<31-1 {
		return nil, fmt.Errorf("RSA exponent %d is not an odd number from 3 to 2^31-1", exp)
	}
	if mod[0]&0x80 == 0 || mod[255]&1 == 0 {
		return nil, errors.New("the RSA modulus is not an odd number of 2048 bits")
	}
	k.pub = &rsa.PublicKey{N: new(big.Int).SetBytes(mod), E: int(exp)}
	h := sha256.Sum256(area)
	k.name = append([]byte{0, algSHA256}, h[:]...)
	return k, nil
}

// tpmChallenge builds the authenticationKey for a device whose TPM has ek
// and srk: a fresh 256-bit HMAC key duplicated to the SRK with an inner
// AES-128 wrapper, whose key is protected for the SRK's Name against the EK
// (MakeCredential). It returns the challenge and the HMAC key.
func tpmChallenge(ek, srk *tpmRSAKey) (blob, hmacKey []byte, err error) {
	inner := randBytes(16)
	hmacKey = randBytes(32)

	// Credential protection (Part 1, 24): seed encrypted to the EK with
	// label "IDENTITY"; symmetric key and HMAC key derived from it.
	credBlob, credSecret, err := makeCredential(ek, srk.name, inner)
	if err != nil {
		return nil, nil, err
	}

	// The HMAC key as a duplicable keyed-hash object.
	seedValue := randBytes(32)
	uniq := sha256.Sum256(append(append([]byte(nil), seedValue...), hmacKey...))
	var pub []byte
	pub = binary.BigEndian.AppendUint16(pub, algKeyedHash)
	pub = binary.BigEndian.AppendUint16(pub, algSHA256)
	pub = binary.BigEndian.AppendUint32(pub, attrUserWithAuth|attrSign)
	pub = appendSized(pub, nil) // authPolicy
	pub = binary.BigEndian.AppendUint16(pub, algHMAC)
	pub = binary.BigEndian.AppendUint16(pub, algSHA256)
	pub = appendSized(pub, uniq[:])
	nh := sha256.Sum256(pub)
	name := append([]byte{0, algSHA256}, nh[:]...)

	var sens []byte // TPMT_SENSITIVE
	sens = binary.BigEndian.AppendUint16(sens, algKeyedHash)
	sens = appendSized(sens, nil) // authValue
	sens = appendSized(sens, seedValue)
	sens = appendSized(sens, hmacKey)
	sens2b := appendSized(nil, sens)

	// Inner wrapper (Part 1, 23.3.2.3): integrity = H(sensitive || name),
	// then AES-128-CFB with the inner key and a zero IV.
	ih := sha256.Sum256(append(append([]byte(nil), sens2b...), name...))
	encSens := cfb(inner, append(appendSized(nil, ih[:]), sens2b...))

	// Outer wrapper: seed encrypted to the SRK with label "DUPLICATE".
	seed := randBytes(32)
	encSeed, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, srk.pub, seed, []byte("DUPLICATE\x00"))
	if err != nil {
		return nil, nil, fmt.Errorf("encrypting the duplication seed: %w", err)
	}
	dup := outerWrap(seed, name, srk.symBits, encSens)

	blob = appendSized(nil, credBlob)
	blob = appendSized(blob, credSecret)
	blob = appendSized(blob, dup)
	blob = appendSized(blob, encSeed)
	blob = appendSized(blob, pub)
	blob = binary.BigEndian.AppendUint16(blob, 0) // no encrypted data
	return blob, hmacKey, nil
}

// makeCredential is TPM2_MakeCredential done outside a TPM: the credential
// blob (TPM2B_ID_OBJECT contents) and the encrypted seed.
func makeCredential(ek *tpmRSAKey, objectName, credential []byte) (blob, secret []byte, err error) {
	seed := randBytes(32)
	secret, err = rsa.EncryptOAEP(sha256.New(), rand.Reader, ek.pub, seed, []byte("IDENTITY\x00"))
	if err != nil {
		return nil, nil, fmt.Errorf("encrypting the credential seed: %w", err)
	}
	return outerWrap(seed, objectName, ek.symBits, appendSized(nil, credential)), secret, nil
}

// outerWrap is the outer wrapper shared by credentials and duplicates:
// AES-CFB under KDFa(seed, "STORAGE", name), zero IV, then an HMAC under
// KDFa(seed, "INTEGRITY") over the ciphertext and the name, prepended as a
// TPM2B_DIGEST.
func outerWrap(seed, name []byte, symBits int, plain []byte) []byte {
	symKey := kdfa(seed, "STORAGE", name, nil, symBits)
	enc := cfb(symKey, plain)
	m := hmac.New(sha256.New, kdfa(seed, "INTEGRITY", nil, nil, 256))
	m.Write(enc)
	m.Write(name)
	return append(appendSized(nil, m.Sum(nil)), enc...)
}

// kdfa is the TPM's KDFa with HMAC-SHA256 (SP 800-108 counter mode; the
// label includes its terminating zero).
func kdfa(key []byte, label string, contextU, contextV []byte, bits int) []byte {
	var out []byte
	for i := uint32(1); len(out)*8 < bits; i++ {
		m := hmac.New(sha256.New, key)
		binary.Write(m, binary.BigEndian, i)
		m.Write([]byte(label))
		m.Write([]byte{0})
		m.Write(contextU)
		m.Write(contextV)
		binary.Write(m, binary.BigEndian, uint32(bits))
		out = m.Sum(out)
	}
	return out[:bits/8]
}

func cfb(key, plain []byte) []byte {
	blk, err := aes.NewCipher(key)
	if err != nil {
		panic(err) // key sizes are fixed above
	}
	out := make([]byte, len(plain))
	//lint:ignore SA1019 the TPM specifies CFB with a zero IV
	cipher.NewCFBEncrypter(blk, make([]byte, aes.BlockSize)).XORKeyStream(out, plain)
	return out
}

func appendSized(b, v []byte) []byte {
	return append(binary.BigEndian.AppendUint16(b, uint16(len(v))), v...)
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// tpmReader reads big-endian TPM structures; the first error sticks.
type tpmReader struct {
	b   []byte
	err error
}

func (r *tpmReader) take(n int) []byte {
	if r.err != nil || len(r.b) < n {
		r.err = errors.New("truncated")
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *tpmReader) u16() uint16 {
	if v := r.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (r *tpmReader) u32() uint32 {
	if v := r.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (r *tpmReader) sized() []byte { return r.take(int(r.u16())) }

// TPMChallenge builds a challenge for the TPM whose EK and SRK public areas
// (TPM2B_PUBLIC) are given, as DPS does on a first TPM registration, and
// returns it with the HMAC key it carries (for tests of device code).
func TPMChallenge(ekPub, srkPub []byte) (blob, hmacKey []byte, err error) {
	ek, err := parseRSAPublic(ekPub)
	if err != nil {
		return nil, nil, fmt.Errorf("endorsement key: %w", err)
	}
	srk, err := parseRSAPublic(srkPub)
	if err != nil {
		return nil, nil, fmt.Errorf("storage root key: %w", err)
	}
	return tpmChallenge(ek, srk)
}
