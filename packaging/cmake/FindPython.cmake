# Found before CMake's own FindPython when packaging/build-extension compiles our extension for a
# node kind: native/CMakeLists.txt asks for the Interpreter too, and the only interpreter here is
# the controller's (another version, another architecture), which CMake would then check the
# target's headers against and refuse. Without it, CMake's FindPython takes the target's headers
# from Python_INCLUDE_DIR, and pybind11 the extension's suffix from PYTHON_MODULE_EXTENSION.
list(REMOVE_ITEM Python_FIND_COMPONENTS Interpreter)
unset(Python_FIND_REQUIRED_Interpreter)
include(${CMAKE_ROOT}/Modules/FindPython.cmake)
