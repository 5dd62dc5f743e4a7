import CkptCore
import CkptSynthesis
import Testing

@Suite("SynthesisSchedule: parsing, validation and step → stage")
struct SynthesisScheduleTests {
    @Test("SIZE:STEPS,… parses into stages and prints back")
    func parses() throws {
        let s = try SynthesisSchedule(parsing: "112:80,224:20")
        #expect(s.stages == [.init(size: 112, steps: 80), .init(size: 224, steps: 20)])
        #expect(s.totalSteps == 100)
        #expect(s.description == "112:80,224:20")
        #expect(try SynthesisSchedule(parsing: s.description) == s)
        #expect(s.sizes == [112, 224])
        #expect(s.firstSteps == [0, 80])
        let repeated = try SynthesisSchedule(parsing: "56:1,112:2,56:3")
        #expect(repeated.sizes == [56, 112])
        #expect(repeated.totalSteps == 6)
    }

    @Test("global steps map to their stage")
    func stageOfStep() throws {
        let s = try SynthesisSchedule(parsing: "112:3,224:2")
        #expect((0..<5).map { s.stageIndex(ofStep: $0) } == [0, 0, 0, 1, 1])
    }

    @Test("malformed text and out-of-range stages are refused", arguments: [
        "", "112", "112:", ":5", "112:80,", "112:80;224:20", "112:-1", "-112:5", "112:0", "0:5", "4097:1", "112:80,224:x", " 112:80",
        "112:1000001", "1:1,1:1,1:1,1:1,1:1,1:1,1:1,1:1,1:1", "112:999999,224:2", "+112:5", "1e2:5",
    ])
    func refuses(text: String) {
        #expect(throws: CkptError.self) { try SynthesisSchedule(parsing: text) }
    }

    @Test("sizes must be multiples of the patch size")
    func patchSize() throws {
        try SynthesisSchedule(parsing: "112:80,224:20").check(patchSize: 14)
        try SynthesisSchedule(parsing: "112:80,224:20").check(patchSize: 16)
        #expect(throws: CkptError.self) { try SynthesisSchedule(parsing: "100:80,224:20").check(patchSize: 14) }
        #expect(throws: CkptError.self) { try SynthesisSchedule(parsing: "8:1").check(patchSize: 16) }
    }

    @Test("the default: half the patch grid, then the model's size; one stage on a small grid")
    func standard() throws {
        let vits14 = try SynthesisSchedule.standard(imageSize: 224, patchSize: 14, lowSteps: 80, fullSteps: 20)
        #expect(vits14.description == "112:80,224:20")
        // An odd grid rounds the first stage down to whole patches.
        #expect(try SynthesisSchedule.standard(imageSize: 240, patchSize: 16, lowSteps: 5, fullSteps: 1).description == "112:5,240:1")
        #expect(try SynthesisSchedule.standard(imageSize: 12, patchSize: 4, lowSteps: 5, fullSteps: 1).description == "12:6")
        #expect(try SynthesisSchedule.single(size: 224, steps: 7).stages == [.init(size: 224, steps: 7)])
        // The CLI's (and formats/synthesis.md's) default for a 224 px ViT.
        #expect(try SynthesisSchedule.standard(imageSize: 224, patchSize: 14).description == "112:40,224:6")
    }
}
